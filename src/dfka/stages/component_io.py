"""The little that every KFP component does around its stage call, kept here so components stay thin.

Nothing here imports kfp: KFP artifacts are duck-typed (``.path``, ``.metadata``, ``.log_metric``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from dfka.stages.context import RunContext


class _Artifact(Protocol):
    path: str
    metadata: dict[str, Any]


def component_context(
    experiment: str, mlflow_tracking_uri: str, bucket: str, output_path: str, variant: str = ""
) -> RunContext:
    """Threads from ``OMP_NUM_THREADS`` (the image sets it; 2 locally), the run from the environment
    (``variant``: the sweep variant the stage belongs to, "" outside a sweep)."""
    from dfka.runtime import set_threads  # torch: only for the stages that train

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    set_threads(None)
    return RunContext.from_env(
        experiment, tracking_uri=mlflow_tracking_uri, bucket=bucket, output_path=output_path, variant=variant
    )


def write_metrics(artifact: Any, metrics: Mapping[str, float]) -> None:
    """``Output[Metrics]``: log each value, and also write the file, without which kfp.local never gets a
    cache hit for the task (platform notes §1a)."""
    clean = {k: float(v) for k, v in metrics.items() if v == v}  # NaN is not JSON and not a metric
    for key, value in clean.items():
        artifact.log_metric(key, value)
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2, sort_keys=True))


def write_text(artifact: Any, text: str) -> None:
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def describe(artifact: Any, result: Mapping[str, Any], **extra: Any) -> None:
    """Metadata the KFP UI shows next to an output artifact."""
    artifact.metadata.update(
        {
            "dfka.stage": result.get("stage"),
            "dfka.published": result.get("published") or "",
            "dfka.mlflow_run_id": result.get("mlflow_run_id") or "",
            "dfka.seconds": round(float(result.get("seconds", 0.0)), 2),
            **extra,
        }
    )
