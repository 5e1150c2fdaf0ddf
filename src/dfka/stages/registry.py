"""The TargetNet in MLflow: logged by the regroup stage, registered by the evaluation stage.

Registration waits for the test scores so that the model registry alone answers "which TargetNet is
best": each version carries its test metrics as tags, a description that reads like the verdict, and
the registry keeps two aliases, ``candidate`` (the newest evaluated version) and ``best`` (the version
with the highest union score on the same test set).

The regroup stage writes ``mlflow-model.json`` beside the TargetNet (the logged model's URI, its run
and the registry name), which is how the evaluation stage, a separate process on KFP, finds the model.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from dfka import storage
from dfka.settings import redact
from dfka.tracking import TrackingRun

log = logging.getLogger(__name__)

LOGGED_MODEL_FILE = "mlflow-model.json"
ALIAS_CANDIDATE = "candidate"
ALIAS_BEST = "best"
TAG_SCORE = "score.union"
TAG_DATASET = "test.dataset"


def model_name(experiment: str) -> str:
    """The registry name derived from the experiment: ``<experiment>-targetnet``."""
    return f"{experiment}-targetnet"


def log_targetnet(
    net: torch.nn.Module,
    example: torch.Tensor,
    tracker: TrackingRun,
    tracking_uri: str | None,
    name: str,
    out: str,
) -> dict[str, Any] | None:
    """Log the TargetNet as an MLflow ``pt2`` model (torch.export, no pickle) on the stage's run and
    write ``mlflow-model.json`` into ``out``; ``None`` (and a warning) when MLflow is offline."""
    if tracker.run_id is None or tracker.offline or tracking_uri is None:
        log.warning("MLflow is offline: the TargetNet is not logged as an MLflow model nor registered")
        return None
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    x = example.clamp(0, 1).numpy()
    with torch.no_grad():
        y = net(example).numpy()
    try:
        info = mlflow.pytorch.log_model(
            net,
            name="targetnet",
            run_id=tracker.run_id,
            input_example=x,
            signature=infer_signature(x, y),
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            metadata={"labels": list(getattr(net, "label_names", [])), "pixel_range": [0.0, 1.0]},
        )
    except Exception as err:  # tracking never fails the stage
        log.warning("could not log the TargetNet to MLflow: %s", redact(str(err))[:300])
        return None
    logged = {
        "name": name,
        "model_uri": info.model_uri,
        "model_id": getattr(info, "model_id", None),
        "run_id": tracker.run_id,
        "version": None,
    }
    storage.put_bytes(json.dumps(logged, indent=2).encode(), storage.join(out, LOGGED_MODEL_FILE))
    return logged


def read_logged(target_net: str) -> dict[str, Any] | None:
    """The regroup stage's ``mlflow-model.json`` (``None``: the model was not logged)."""
    key = storage.join(target_net, LOGGED_MODEL_FILE)
    if not storage.exists(key):
        return None
    return json.loads(storage.get_bytes(key))


def register_evaluated(
    client: Any, logged: dict[str, Any], tags: dict[str, str], description: str
) -> dict[str, Any] | None:
    """Register the logged TargetNet as a new version of ``logged["name"]`` with ``tags`` and
    ``description``, point ``candidate`` at it and ``best`` at the best version on the same test set.
    Best effort: a registry failure is a warning, never a failed evaluation."""
    from mlflow.exceptions import MlflowException

    name = logged["name"]
    try:
        try:
            client.create_registered_model(name, description="TargetNets amalgamated by dfka, one per run")
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            logged["model_uri"],
            run_id=logged.get("run_id"),
            tags=tags,
            description=description,
            model_id=logged.get("model_id"),
            await_creation_for=60,
        )
        client.set_registered_model_alias(name, ALIAS_CANDIDATE, version.version)
        best = _best_version(client, name, tags.get(TAG_DATASET, ""))
        if best is not None:
            client.set_registered_model_alias(name, ALIAS_BEST, best)
    except Exception as err:
        log.warning("could not register the TargetNet %s in MLflow: %s", name, redact(str(err))[:300])
        return None
    aliases = [ALIAS_CANDIDATE] + ([ALIAS_BEST] if best == str(version.version) else [])
    return {**logged, "version": str(version.version), "aliases": aliases}


def _best_version(client: Any, name: str, dataset: str) -> str | None:
    """The version with the highest ``score.union`` tag among those scored on ``dataset`` (the newest
    one on a tie)."""
    scored = []
    for v in client.search_model_versions(f"name='{name}'"):
        try:
            score = float(v.tags.get(TAG_SCORE, "nan"))
        except ValueError:
            continue
        if score == score and v.tags.get(TAG_DATASET, "") == dataset:
            scored.append((score, int(v.version)))
    return str(max(scored)[1]) if scored else None
