"""The pipeline's stages as plain, typed functions: local paths or ``s3://`` URIs in, a small dict out.

They need no kfp: the CLI, the KFP components (``components/``) and the benchmarks all call these.
Order and data flow (each output folder is the next stage's input)::

    ingest_teachers(teachers, out)                          -> teacher set (config, verified bundles, report)
    train_amalgamating_gan(teacher_set, out)                -> generator (+ trajectory samples)     stage 1
    export_synthetic_samples(teacher_set, gan, out)         -> sharded samples in the object store
    train_dual_generator_blocks(teacher_set, samples, out)  -> dual generator                       stage 2
    regroup_target_net(teacher_set, samples, dual, out)     -> TargetNet (+ TorchScript, MLflow model) stage 3
    evaluate(teacher_set, target_net, samples, out)         -> results table, confusion matrix, report,
                                                               the TargetNet registered with its scores

Stages 0-3 run under the data-free guard; only ``evaluate`` reads real images (the test split).
Pass a :class:`RunContext` to track the stage in MLflow and publish its output under
``s3://<bucket>/runs/<run-id>/<stage>/``; without one a stage only writes ``out``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name -> module; imported on first use, so ``import dfka.stages.context`` stays free of torch
_EXPORTS = {
    "RunContext": "dfka.stages.context",
    "ingest_teachers": "dfka.stages.ingest",
    "train_amalgamating_gan": "dfka.stages.training",
    "export_synthetic_samples": "dfka.stages.training",
    "train_dual_generator_blocks": "dfka.stages.training",
    "regroup_target_net": "dfka.stages.training",
    "model_name": "dfka.stages.registry",
    "evaluate": "dfka.stages.evaluation",
}
__all__ = [
    "RunContext",
    "evaluate",
    "export_synthetic_samples",
    "ingest_teachers",
    "model_name",
    "regroup_target_net",
    "train_amalgamating_gan",
    "train_dual_generator_blocks",
]

if TYPE_CHECKING:
    from dfka.stages.context import RunContext
    from dfka.stages.evaluation import evaluate
    from dfka.stages.ingest import ingest_teachers
    from dfka.stages.registry import model_name
    from dfka.stages.training import (
        export_synthetic_samples,
        regroup_target_net,
        train_amalgamating_gan,
        train_dual_generator_blocks,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dfka.stages' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
