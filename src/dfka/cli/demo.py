"""``dfka demo``: the main job on the embedded default, end to end on this machine.

It starts (or reuses) the local SeaweedFS + MLflow stack, builds the demo teacher set into the bucket
(cached), and prints each teacher's test accuracy with links to MLflow and the bucket.
"""

from __future__ import annotations

import argparse
import os
import time


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the demo on the local stack (teachers into S3, runs into MLflow)")
    demo.add_argument("--teachers", default="configs/demo-teachers.yaml", help="teacher-set config")
    demo.add_argument("--threads", type=int)
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from dfka.cli.teachers import _zoo
    from dfka.stack import stack_up

    started = time.perf_counter()
    info = stack_up()
    for key, value in info.env().items():
        os.environ.setdefault(key, value)
    print(
        f"stack: S3 {info.s3_endpoint}  MLflow {info.mlflow_uri}  (started: {', '.join(info.started) or 'none'})"
    )
    _zoo(argparse.Namespace(config=args.teachers, force=False, threads=args.threads))
    print(f"\nMLflow UI:   {info.mlflow_uri}  (experiment dfka-teachers)")
    print(
        f"bundles:     s3://{info.bucket}/teachers/demo/  (S3 endpoint {info.s3_endpoint}; `dfka stack status`)"
    )
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0
