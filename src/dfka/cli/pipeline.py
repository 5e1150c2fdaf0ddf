"""``dfka pipeline run|sweep|compile|submit``: the KFP pipelines, locally or on a cluster.

The pipeline code (``pipelines/``, ``components/``) imports kfp and dfka never does, so each command
runs ``python -m pipelines.<module>`` from the repository in a subprocess.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "pipeline", help="run the KFP pipeline locally, compile it, submit it to a cluster"
    )
    cmds = group.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    run = cmds.add_parser("run", help="run all six stages locally with kfp.local against the local stack")
    run.add_argument("--config", required=True, help="experiment config, e.g. configs/demo.yaml")
    run.add_argument("--local-root", help="kfp.local output folder (default $DFKA_HOME/pipeline-runs)")
    run.add_argument("--results-json", help="also write the run summary (JSON) here")
    run.add_argument("--verbose", action="store_true", help="stream the stage logs (default: to a log file)")
    run.add_argument(
        "--run-id", help="rerun with this run id: a stage that was cut off resumes from its last checkpoint"
    )
    run.set_defaults(func=_run)

    sweep = cmds.add_parser(
        "sweep",
        help="run the variants of a config's sweep: section (seeds x configs x teacher sets) as one "
        "kfp.local run, then one comparison table and plot",
    )
    sweep.add_argument("--config", required=True, help="experiment config with a sweep: section")
    sweep.add_argument("--local-root", help="kfp.local output folder (default $DFKA_HOME/pipeline-runs)")
    sweep.add_argument("--results-json", help="also write the sweep summary (JSON) here")
    sweep.add_argument(
        "--verbose", action="store_true", help="stream the stage logs (default: to a log file)"
    )
    sweep.add_argument(
        "--run-id", help="rerun with this run id: cut-off stages resume from their checkpoints"
    )
    sweep.add_argument(
        "--print-variants",
        action="store_true",
        help="print the variants parameter as JSON (for `kfp run create ... variants=...`) and stop",
    )
    sweep.set_defaults(func=_sweep)

    comp = cmds.add_parser(
        "compile",
        help="compile the pipeline YAMLs (default: pipelines/dfka_pipeline.yaml and pipelines/dfka_sweep.yaml)",
    )
    comp.add_argument("--out", help="write one file here instead (the sweep's with --sweep)")
    comp.add_argument("--sweep", action="store_true", help="with --out: compile the sweep pipeline")
    comp.add_argument("--config", help="bake an experiment config's pipeline settings and values in")
    comp.set_defaults(func=_compile)

    sub_ = cmds.add_parser("submit", help="submit the compiled YAML to a KFP API")
    sub_.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://127.0.0.1:8888")
    sub_.add_argument("--experiment", default="dfka", help="KFP experiment (default %(default)s)")
    sub_.add_argument("--run-name")
    sub_.add_argument("--package", help="compiled YAML (default pipelines/dfka_pipeline.yaml)")
    sub_.add_argument("--config", help="take the run parameters from this experiment config")
    sub_.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    sub_.add_argument("--namespace")
    sub_.add_argument("--pipeline-root")
    sub_.add_argument("--service-account")
    sub_.add_argument("--token", help="bearer token (or set DFKA_KFP_TOKEN)")
    sub_.add_argument("--dry-run", action="store_true", help="print the run request instead of sending it")
    sub_.set_defaults(func=_submit)


def _run(args: argparse.Namespace, sweep: bool = False) -> int:
    from pathlib import Path

    from dfka.ops.pipeline_runner import run_module

    opts = ["--config", str(Path(args.config).absolute())] + (["--sweep"] if sweep else [])
    if args.local_root:
        opts += ["--local-root", str(Path(args.local_root).absolute())]
    if args.results_json:
        opts += ["--results-json", str(Path(args.results_json).absolute())]
    if args.verbose:
        opts.append("--verbose")
    if args.run_id:
        opts += ["--run-id", args.run_id]
    return run_module("run_local", opts)


def _sweep(args: argparse.Namespace) -> int:
    if args.print_variants:  # plain dfka: no kfp, no stack
        import json

        from dfka.pipeline_config import ExperimentConfig

        print(json.dumps(ExperimentConfig.load(args.config).sweep_variants(), separators=(",", ":")))
        return 0
    return _run(args, sweep=True)


def _compile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dfka.ops.pipeline_runner import run_module

    opts = []
    if args.out:
        opts += ["--out", str(Path(args.out).absolute())]
    if args.config:
        opts += ["--config", str(Path(args.config).absolute())]
    if args.sweep:
        opts.append("--sweep")
    return run_module("compile", opts)


def _submit(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from dfka.ops.pipeline_runner import run_module
    from dfka.settings import KFP_TOKEN_ENV

    opts = ["--host", args.host, "--experiment", args.experiment]
    if args.token:  # through the environment, not argv (visible to other users in the process list)
        os.environ[KFP_TOKEN_ENV] = args.token
    for flag in ("run_name", "namespace", "pipeline_root", "service_account"):
        if getattr(args, flag):
            opts += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    for flag in ("package", "config"):
        if getattr(args, flag):
            opts += [f"--{flag}", str(Path(getattr(args, flag)).absolute())]
    for item in args.param:
        opts += ["--param", item]
    if args.dry_run:
        opts.append("--dry-run")
    return run_module("submit", opts)
