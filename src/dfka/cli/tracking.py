"""``dfka tracking status|sync``: runs recorded offline while the MLflow server was unreachable."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tracking", help="offline MLflow runs: list and sync them")
    sub = parser.add_subparsers(dest="tracking_command", required=True, metavar="ACTION")
    sub.add_parser("status", help="list offline runs waiting to be synced").set_defaults(func=_status)
    sync = sub.add_parser("sync", help="replay offline runs to the MLflow server")
    sync.add_argument("--uri", help="tracking server (default: MLFLOW_TRACKING_URI)")
    sync.add_argument(
        "--include-unfinished", action="store_true", help="also sync runs without an end record (as KILLED)"
    )
    sync.set_defaults(func=_sync)


def _status(args: argparse.Namespace) -> int:
    from dfka.tracking import pending_offline

    runs = pending_offline()
    if not runs:
        print("no offline runs")
    for run in runs:
        head = run.header
        state = "finished" if run.finished else "unfinished"
        print(
            f"{head['experiment']:<24} {head['run_name']:<24} {state:<10} {len(run.records):>5} records  {run.path}"
        )
    return 0


def _sync(args: argparse.Namespace) -> int:
    from dfka.tracking import sync_offline

    results = sync_offline(args.uri, include_unfinished=args.include_unfinished)
    if not results:
        print("nothing to sync")
    for r in results:
        detail = r.run_id if r.status == "synced" else r.detail
        print(f"{r.status:<8} {r.experiment}/{r.run_name}: {detail}")
    return 1 if any(r.status == "failed" for r in results) else 0
