"""What a stage knows about the run it belongs to: run id, MLflow, object store, provenance.

Stages get this from the environment, never from their inputs, so that a stage's inputs (its cache
key on KFP) stay the same from run to run:

======================  ===============================================================================
``DFKA_KFP_RUN_ID``     the pipeline run id: the pod label ``pipeline/runid`` on a cluster (set by the
                        pipeline through the downward API), ``local-…`` from ``dfka pipeline run``
``DFKA_GIT_COMMIT``     the source commit (baked into the stage image; ``dfka pipeline run`` sets it)
``MLFLOW_TRACKING_URI`` the tracking server (ConfigMap ``dfka-pipeline-config``), unless a parameter says
``DFKA_BUCKET``         the bucket for ``runs/<run-id>/<stage>/`` (ConfigMap), unless a parameter says
======================  ===============================================================================

MLflow layout: one parent run per pipeline run (tag ``dfka.kfp_run_id``; the first stage that runs
creates it, later stages find it by that tag), named after the experiment, the variant and the seed
(:func:`parent_run_name`), and one child run per stage. In a sweep (``pipelines/dfka_sweep.py``) every
stage also gets its variant's name: the variant's run id is ``<run id>-<variant>`` (its own S3 prefix
and parent run), and its parent run is a child of the sweep's run (tag ``dfka.kind = sweep``). Every run carries the tags
``dfka.kfp_run_id``, ``dfka.git_commit`` and ``dfka.config_hash``. Tracking never stops a stage: an
unreachable server sends the child runs to ``dfka.tracking``'s offline mode.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfka import storage
from dfka.settings import GIT_COMMIT_ENV, RUN_ID_ENV, default_bucket, redact
from dfka.tracking import Tracker, TrackingRun, clean_params, experiment_id, mlflow_client, probe

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

TAG_RUN_ID = "dfka.kfp_run_id"
TAG_COMMIT = "dfka.git_commit"
TAG_CONFIG = "dfka.config_hash"
TAG_KIND = "dfka.kind"
TAG_STAGE = "dfka.stage"
TAG_OUTPUTS = "dfka.outputs"
TAG_SWEEP = "dfka.sweep_run_id"
TAG_VARIANT = "dfka.variant"


def new_local_run_id() -> str:
    return f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def run_id_from_path(path: str) -> str:
    """Fallback run id from a KFP output path: ``<root>/<run>/<task>/<output>`` (local and cluster)."""
    parts = Path(path).parts
    return re.sub(r"[^A-Za-z0-9._-]+", "-", parts[-3]) if len(parts) >= 3 else new_local_run_id()


def object_store_configured() -> bool:
    return bool(
        any(os.environ.get(k) for k in storage.ENDPOINT_KEYS)
        and os.environ.get("AWS_ACCESS_KEY_ID")
        and os.environ.get("AWS_SECRET_ACCESS_KEY")
    )


@dataclass
class RunContext:
    """The run a stage belongs to. ``RunContext.from_env`` is what components use."""

    experiment: str = "dfka"
    run_id: str = field(default_factory=new_local_run_id)
    tracking_uri: str | None = None
    bucket: str | None = None
    git_commit: str = "unknown"
    track: bool = True
    publish: bool = True
    progress: bool = False
    #: in a sweep: the variant's name and the sweep's run id (``run_id`` is ``<sweep_run_id>-<variant>``)
    variant: str = ""
    sweep_run_id: str | None = None
    _parent_id: str | None = field(default=None, repr=False)
    _parent_checked: bool = field(default=False, repr=False)

    @classmethod
    def from_env(
        cls,
        experiment: str = "dfka",
        *,
        tracking_uri: str = "",
        bucket: str = "",
        output_path: str = "",
        progress: bool = False,
        variant: str = "",
    ) -> RunContext:
        run_id = os.environ.get(RUN_ID_ENV, "").strip() or (
            run_id_from_path(output_path) if output_path else new_local_run_id()
        )
        return cls(
            experiment=experiment or "dfka",
            run_id=f"{run_id}-{variant}" if variant else run_id,
            variant=variant,
            sweep_run_id=run_id if variant else None,
            tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None,
            bucket=bucket or default_bucket(),
            git_commit=os.environ.get(GIT_COMMIT_ENV, "").strip() or "unknown",
            progress=progress,
        )

    # ------------------------------------------------------------ object store

    def publish_uri(self, stage: str) -> str | None:
        """``s3://<bucket>/runs/<run-id>/<stage>`` when an object store is configured, else ``None``."""
        if not (self.publish and self.bucket and object_store_configured()):
            return None
        return f"s3://{self.bucket}/runs/{self.run_id}/{stage}"

    # ------------------------------------------------------------ MLflow

    def tags(self, config_hash: str | None = None) -> dict[str, str]:
        tags = {TAG_RUN_ID: self.run_id, TAG_COMMIT: self.git_commit}
        if self.sweep_run_id:
            tags |= {TAG_SWEEP: self.sweep_run_id, TAG_VARIANT: self.variant}
        if config_hash:
            tags[TAG_CONFIG] = config_hash
        return tags

    def parent(
        self, config_hash: str | None = None, config: Mapping[str, Any] | None = None
    ) -> ParentRun | None:
        """The pipeline run's parent MLflow run (found by tag, created if missing, named from ``config``,
        the experiment config, when given); ``None`` offline."""
        if not self.track or self.tracking_uri is None:
            return None
        client = _client(self.tracking_uri)
        if client is None:
            return None
        if not self._parent_checked:
            self._parent_checked = True
            name = (
                parent_run_name(config, self.sweep_run_id or self.run_id)
                if config
                else f"pipeline {self.run_id}"
            )
            if self.variant:
                name = f"{self.variant} · {name}"
            self._parent_id = _find_or_create_parent(client, self, config_hash, name)
        return ParentRun(client, self._parent_id) if self._parent_id else None

    @contextmanager
    def stage_run(self, stage: str, params: Mapping[str, Any], config_hash: str) -> Iterator[TrackingRun]:
        """A child run for ``stage`` with the whole config as params; FAILED if the block raises."""
        if not self.track:
            yield NullTracker()
            return
        parent = self.parent(config_hash, params)
        tags = {**self.tags(config_hash), TAG_KIND: "stage", TAG_STAGE: stage}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.run_id
            parent.set_tags({TAG_CONFIG: config_hash})
        tracker = Tracker.start(self.experiment, stage, tags=tags, tracking_uri=self.tracking_uri)
        try:
            tracker.log_params(params)
            yield tracker
        except BaseException:
            tracker.end("FAILED")
            if parent is not None:
                parent.set_tags({"dfka.failed_stage": stage})
            raise
        tracker.end("FINISHED")


class NullTracker:
    """Stands in for a :class:`~dfka.tracking.Tracker` when a stage runs without tracking."""

    run_id: str | None = None
    offline = False

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        pass


class ParentRun:
    """The parent run, addressed by id from any stage process. Every call is best effort."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def _try(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as err:
            log.warning(
                "MLflow: could not %s on the parent run %s: %s", what, self.run_id, redact(str(err))[:300]
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._try(
            "set tags",
            lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]),
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = list(clean_params(params).items())
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._try(
                "log params",
                lambda chunk=chunk: self.client.log_batch(
                    self.run_id, params=[Param(k, v) for k, v in chunk]
                ),
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        entities = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        for i in range(0, len(entities), 1000):
            chunk = entities[i : i + 1000]
            self._try("log metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk))

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        path = Path(local_path)
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._try("log an artifact", lambda: upload(self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED") -> None:
        self._try("end the run", lambda: self.client.set_terminated(self.run_id, status=status))


def _client(uri: str) -> MlflowClient | None:
    if (reason := probe(uri)) is not None:
        log.warning("MLflow at %s is unreachable (%s): stage runs are recorded offline", uri, reason)
        return None
    return mlflow_client(uri)


def find_parent(client: MlflowClient, experiment: str, run_id: str, kind: str = "pipeline") -> str | None:
    """The parent run of pipeline run ``run_id`` (``kind="sweep"``: of the sweep with that run id)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{TAG_RUN_ID}` = '{run_id}' AND tags.`{TAG_KIND}` = '{kind}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def parent_run_name(config: Mapping[str, Any], run_id: str) -> str:
    """What a runs list needs to tell parents apart: ``dfka-demo · dfka lenet5:1.0 5 min · seed 0 · 3f9a2c``
    (experiment · preset, student and budget · seed · the run id's last part)."""
    amalgamation = config.get("amalgamation") or {}
    minutes = amalgamation.get("budget_minutes")
    budget = f"{minutes:g} min" if isinstance(minutes, int | float) else "step budgets"
    variant = f"{amalgamation.get('preset', 'dfka')} {amalgamation.get('student', '?')} {budget}"
    seed = amalgamation.get("seed", "?")
    return f"{config.get('experiment') or 'dfka'} · {variant} · seed {seed} · {run_id.rsplit('-', 1)[-1]}"


def _find_or_create_parent(
    client: MlflowClient, ctx: RunContext, config_hash: str | None, run_name: str, kind: str = "pipeline"
) -> str | None:
    """The run tagged ``dfka.kind = kind`` for ``ctx.run_id``, created if missing (a sweep variant's
    pipeline run nests under its sweep's run); ``None`` if MLflow fails."""
    try:
        found = find_parent(client, ctx.experiment, ctx.run_id, kind)
        if found:
            return found
        tags = {**ctx.tags(config_hash), TAG_KIND: kind}
        if ctx.sweep_run_id and (sweep := find_parent(client, ctx.experiment, ctx.sweep_run_id, "sweep")):
            tags["mlflow.parentRunId"] = sweep  # the sweep's open step made it before any variant ran
        run = client.create_run(experiment_id(client, ctx.experiment), tags=tags, run_name=run_name)
        return run.info.run_id
    except Exception as err:
        log.warning("MLflow: no parent run for %s: %s", ctx.run_id, redact(str(err))[:300])
        return None


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
