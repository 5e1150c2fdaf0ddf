"""``dfka stack up|down|status``: the local SeaweedFS + MLflow stack."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("stack", help="start/stop the local SeaweedFS S3 + MLflow stack")
    sub = parser.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    sub.add_parser("up", help="start (or reuse) the stack and write $DFKA_HOME/stack.env").set_defaults(
        func=_up
    )
    sub.add_parser("down", help="stop the processes `dfka stack up` started").set_defaults(func=_down)
    sub.add_parser("status", help="one line per service").set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    from dfka.ops.stack import stack_up
    from dfka.settings import stack_env_file

    info = stack_up()
    print(f"started: {', '.join(info.started) or 'nothing (already running or external)'}")
    print(f"S3 endpoint: {info.s3_endpoint}  (bucket {info.bucket}, access key {info.access_key})")
    print(f"MLflow UI:   {info.mlflow_uri}")
    print(
        f"settings:    {stack_env_file()}  (dfka loads it automatically; the secret key is only in that file)"
    )
    return 0


def _down(args: argparse.Namespace) -> int:
    from dfka.ops.stack import stack_down

    stopped = stack_down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")
    return 0


def _status(args: argparse.Namespace) -> int:
    from dfka.ops.stack import stack_status

    statuses = stack_status()
    for status in statuses:
        print(status.line())
    return 0 if all(s.state in ("running", "external") for s in statuses) else 1
