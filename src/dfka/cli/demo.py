"""``dfka demo``: the main job on the embedded default, end to end on this machine.

It starts (or reuses) the local SeaweedFS + MLflow stack, builds the demo teacher set into the bucket
(cached), runs the six-stage pipeline locally with kfp.local, and prints the results table with links
to MLflow and the bucket.
"""

from __future__ import annotations

import argparse
import os
import time


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="build the demo teachers and run the whole pipeline on the local stack"
    )
    demo.add_argument("--teachers", default="configs/demo-teachers.yaml", help="teacher-set config")
    demo.add_argument("--config", default="configs/demo.yaml", help="experiment config the pipeline runs")
    demo.add_argument("--threads", type=int)
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from dfka.cli.teachers import _zoo
    from dfka.ops.pipeline_runner import run_local
    from dfka.ops.stack import stack_up
    from dfka.pipeline_config import ExperimentConfig

    started = time.perf_counter()
    info = stack_up()
    for key, value in info.env().items():
        os.environ.setdefault(key, value)
    print(
        f"stack: S3 {info.s3_endpoint}  MLflow {info.mlflow_uri}  (started: {', '.join(info.started) or 'none'})"
    )
    # teachers train at the stages' thread setting (the experiment's pipeline.threads), not all cores
    threads = args.threads or ExperimentConfig.load(args.config).pipeline.threads
    _zoo(argparse.Namespace(config=args.teachers, force=False, threads=threads))
    teachers_seconds = time.perf_counter() - started
    run_local(args.config)  # prints the results table, wall-clock per stage, MLflow/model/bucket links
    print(
        f"\nteachers:    s3://{info.bucket}/teachers/demo/  (experiment dfka-teachers, {teachers_seconds:.0f} s)"
    )
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0
