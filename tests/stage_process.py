"""Run one training stage the way its KFP component does, in a process of its own (tests kill it).

    python -m tests.stage_process gan TEACHER_SET OUT
    python -m tests.stage_process blocks TEACHER_SET SAMPLES OUT

It calls the component's own function (``components.train_amalgamating_gan.python_func``) with plain
stand-ins for the KFP artifacts, so the run id, object store and MLflow come from the environment
exactly as in a pipeline pod. ``DFKA_TEST_STEP_SECONDS`` slows every training step down (a sleep after
the step; the numbers are untouched) so that a test can stop a server or kill the process mid-run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class _Artifact:
    def __init__(self, path: str) -> None:
        self.path = path
        self.metadata: dict[str, Any] = {}


class _Metrics(_Artifact):
    def log_metric(self, key: str, value: float) -> None:
        self.metadata[key] = value


def _slow_steps(seconds: float) -> None:
    from dfka.amalgamation.stage1 import GanTrainer
    from dfka.amalgamation.stage2 import BlockTrainer

    for cls in (GanTrainer, BlockTrainer):
        real = cls.step

        def step(self: Any, step: int, total: int, _real: Any = real) -> Any:
            out = _real(self, step, total)
            time.sleep(seconds)
            return out

        cls.step = step  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    stage, *paths = argv
    if seconds := float(os.environ.get("DFKA_TEST_STEP_SECONDS", "0") or 0):
        _slow_steps(seconds)
    experiment = os.environ.get("DFKA_TEST_EXPERIMENT", "dfka-test-stages")
    run = {"experiment": experiment, "mlflow_tracking_uri": "", "bucket": ""}
    metrics = _Metrics(str(Path(paths[-1]).parent / f"{Path(paths[-1]).name}-metrics.json"))
    if stage == "gan":
        from components.train_amalgamating_gan import train_amalgamating_gan

        teacher_set, out = paths
        artifact = _Artifact(out)
        train_amalgamating_gan.python_func(
            teacher_set=_Artifact(teacher_set), gan=artifact, metrics=metrics, **run
        )
    elif stage == "blocks":
        from components.train_dual_generator_blocks import train_dual_generator_blocks

        teacher_set, samples, out = paths
        artifact = _Artifact(out)
        train_dual_generator_blocks.python_func(
            teacher_set=_Artifact(teacher_set),
            samples=_Artifact(samples),
            dual=artifact,
            metrics=metrics,
            **run,
        )
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    print(json.dumps({"metadata": artifact.metadata}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
