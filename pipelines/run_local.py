"""Run the whole pipeline on this machine: ``python -m pipelines.run_local --config configs/demo.yaml``.

kfp.local runs each stage as a subprocess of this venv (``SubprocessRunner(use_venv=False)``) against
the local SeaweedFS + MLflow stack (started if the environment does not point at one). The run gets an
id ``local-…`` that every stage reads from ``DFKA_KFP_RUN_ID``: the MLflow parent run is tagged with it
and every stage publishes its output to ``s3://<bucket>/runs/<run-id>/<stage>/``, as on a cluster.
Prints the results table, the wall-clock per stage and the links; ``--results-json`` writes it all.

``--sweep`` runs the sweep pipeline (``pipelines/dfka_sweep.py``) on the config's ``sweep:`` variants
instead: kfp.local (kfp 2.17) runs its ``ParallelFor``, at most 2 variants at a time, and its fan-in.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from dfka import storage
from dfka.errors import ConfigError, DfkaError
from dfka.ops.run_lock import check_run_id, die_with_parent, processes_with_env, run_lock, stop_leftovers
from dfka.ops.stack import StackPorts
from dfka.pipeline_config import STAGES, ExperimentConfig, RetrySettings
from dfka.runtime import env_var
from dfka.settings import (
    GIT_COMMIT_ENV,
    PARENT_PID_ENV,
    RUN_ID_ENV,
    default_bucket,
    dfka_home,
    load_stack_env,
    redact,
)
from dfka.stages.context import (
    experiment_id,
    find_parent,
    new_local_run_id,
    object_store_configured,
    run_url,
)

log = logging.getLogger("dfka.pipeline")


def git_commit(cwd: Path | None = None) -> str:
    """``HEAD`` (12 hex), with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=cwd, capture_output=True).returncode != 0
        )
        return f"{head}-dirty" if dirty else head
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ensure_stack() -> dict[str, str]:
    """Use the stack the environment points at, or start (or reuse) the local one."""
    load_stack_env()
    if os.environ.get("MLFLOW_TRACKING_URI") and object_store_configured():
        return {}
    from dfka.ops.stack import stack_up

    info = stack_up()
    applied = {k: v for k, v in info.env().items() if not os.environ.get(k)}
    os.environ.update(applied)
    print(
        f"stack: S3 {info.s3_endpoint}  MLflow {info.mlflow_uri}  (started: {', '.join(info.started) or 'none'})"
    )
    return applied


def run(
    config_path: str,
    *,
    local_root: str | None = None,
    run_id: str | None = None,
    verbose: bool = False,
    sweep: bool = False,
) -> dict[str, Any]:
    """Run the pipeline (``sweep``: the sweep pipeline) locally; return the summary (results, per-stage
    times, links)."""
    if run_id:
        check_run_id(run_id)
    cfg = ExperimentConfig.load(config_path)
    if sweep and cfg.sweep is None:
        raise ConfigError(
            f"{config_path} has no sweep: section",
            "add one (seeds, configs, teacher_sets; README 'Sweeps'), or run it once with `dfka pipeline run`",
        )
    # a bad override fails here, naming its variant
    arguments = cfg.sweep_arguments() if sweep else cfg.pipeline_arguments()
    variants = arguments.get("variants")
    ensure_stack()
    # bad bundles, labels or method settings fail here, in seconds and in one line, not in a stage
    from dfka.stages.ingest import preflight, preflight_variants

    preflight_variants(variants) if variants else preflight(cfg)
    run_id = run_id or new_local_run_id()
    if variants:  # every variant's run id must be a safe name too
        check_run_id(f"{run_id}-{max((v['variant'] for v in variants), key=len)}")
    with run_lock(dfka_home(), run_id):  # one runner per run id; the kernel frees it however we die
        return _run_locked(cfg, config_path, run_id, local_root, verbose, arguments)


def _run_locked(
    cfg: ExperimentConfig,
    config_path: str,
    run_id: str,
    local_root: str | None,
    verbose: bool,
    arguments: dict[str, Any],
) -> dict[str, Any]:
    """Run the pipeline (the sweep pipeline if ``arguments`` has ``variants``) with these parameters."""
    from kfp import local

    from pipelines.dfka_pipeline import build
    from pipelines.dfka_sweep import build_sweep

    stop_leftovers(RUN_ID_ENV, run_id)  # stages of a killed runner of this id must not race this one
    os.environ[RUN_ID_ENV] = run_id
    os.environ.setdefault(GIT_COMMIT_ENV, git_commit())
    if cfg.pipeline.threads is not None:  # the experiment's setting wins over the shell's
        os.environ["OMP_NUM_THREADS"] = str(cfg.pipeline.threads)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    root = Path(local_root or cfg.pipeline.local_root or dfka_home() / "pipeline-runs").absolute()
    root.mkdir(parents=True, exist_ok=True)
    bucket = cfg.pipeline.bucket or default_bucket()
    # kfp.local warns per task that the image name has no "python" in it and that resources, accelerators
    # and retries are cluster-only settings: true, and expected here
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
    warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        enable_caching=cfg.pipeline.caching,
        raise_on_error=True,
    )
    logfile = root / f"{run_id}.log"
    sweep = "variants" in arguments
    what = f"sweep of {len(arguments['variants'])} variants" if sweep else "run"
    print(f"dfka pipeline: {what} {run_id}, config {config_path}")
    print(f"  stage outputs {root}, stage logs {logfile}" + ("" if verbose else " (--verbose streams them)"))
    # kfp.local honours retries with their real backoff (60 s, 120 s, ...): locally a failure is a bug,
    # not a preempted node, so it should surface at once
    settings = cfg.pipeline.model_copy(update={"retries": RetrySettings(num_retries=0)})
    # each kfp.local task leaves a mktemp folder behind (platform notes §1a): give them one to leave
    scratch = root / f".tmp-{run_id}"
    if scratch.exists():  # left by a killed runner of this id (we hold the lock: nobody uses it)
        log.info("removing %s, left over from an earlier runner of run %s", scratch, run_id)
        shutil.rmtree(scratch)
    scratch.mkdir()
    started = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(shutil.rmtree, scratch, True)
            stack.enter_context(_stages_stop_on_sigterm(run_id))
            stack.enter_context(env_var("TMPDIR", str(scratch)))
            if not verbose:  # kfp.local prints each stage's output (and its full executor input) to stdout
                log_stream = stack.enter_context(logfile.open("w"))
                stack.enter_context(contextlib.redirect_stdout(_Progress(log_stream, sys.stdout)))
            if sweep:
                build_sweep(settings, cfg.sweep)(**arguments)
            else:
                build(settings)(**arguments)
    except BaseException:
        _fail_parent(cfg.experiment, run_id)
        if not verbose and logfile.is_file():
            tail = logfile.read_text(errors="replace").splitlines()[-40:]
            print("\n".join(["", f"--- last lines of {logfile} ---", *tail]), file=sys.stderr)
        raise
    seconds = time.perf_counter() - started
    summary = (collect_sweep if sweep else collect)(cfg, run_id, bucket, root, seconds)
    summary["config"] = str(config_path)
    summary["log"] = str(logfile)
    return summary


@contextlib.contextmanager
def _stages_stop_on_sigterm(run_id: str):
    """On SIGTERM, stop this run's stage processes first (kfp.local waits for the running one), then
    exit 143 through the normal clean-up: the parent MLflow run is marked failed, the scratch removed."""

    def stop(signum: int, frame: Any) -> None:
        print(
            f"dfka pipeline: run {run_id} stopped (signal {signum}); the same command resumes it",
            file=sys.stderr,
        )
        for pid in processes_with_env(RUN_ID_ENV, run_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: kfp.local colours task names with ANSI escapes; they belong on a terminal, not in a file
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Progress:
    """A stdout that writes everything to the log file and shows only kfp.local's stage start/end lines;
    colour codes go to a terminal only."""

    SHOW = ("Executing task", "finished with status")

    def __init__(self, log_stream: Any, terminal: Any):
        self.log, self.terminal, self.partial = log_stream, terminal, ""
        self.colour = bool(getattr(terminal, "isatty", lambda: False)())

    def write(self, text: str) -> int:
        self.log.write(ANSI.sub("", text))
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if any(marker in line for marker in self.SHOW):
                self.terminal.write((line if self.colour else ANSI.sub("", line)) + "\n")
                self.terminal.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


def _fail_parent(experiment: str, run_id: str) -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return
    with contextlib.suppress(Exception):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        for kind in ("pipeline", "sweep"):
            parent = find_parent(client, experiment, run_id, kind)
            if parent:
                client.set_terminated(parent, status="FAILED")


def _stage_result(bucket: str, run_id: str, root: Path, stage: str, started: float) -> dict[str, Any] | None:
    published = f"s3://{bucket}/runs/{run_id}/{stage}/result.json"
    with contextlib.suppress(DfkaError):
        if storage.exists(published):
            return json.loads(storage.get_bytes(published))
    # not published (no object store): the newest local output of this stage
    candidates = [p for p in root.glob(f"*/{stage}/*/result.json") if p.stat().st_mtime >= started]
    return json.loads(max(candidates, key=lambda p: p.stat().st_mtime).read_text()) if candidates else None


def collect(cfg: ExperimentConfig, run_id: str, bucket: str, root: Path, seconds: float) -> dict[str, Any]:
    started = time.time() - seconds - 1
    stages: dict[str, Any] = {}
    evaluation: dict[str, Any] | None = None
    registered: dict[str, Any] | None = None
    for stage in STAGES:
        result = _stage_result(bucket, run_id, root, stage, started)
        if result is None:  # a cache hit re-uses an older run's output and publishes nothing new
            stages[stage] = {"cached": True}
            continue
        stages[stage] = {
            "seconds": result.get("seconds"),
            "process_seconds": result.get("process_seconds"),
            "loop_seconds": (result.get("report") or {}).get("seconds"),
            "published": result.get("published"),
            "mlflow_run_id": result.get("mlflow_run_id"),
            "tracking_offline": result.get("tracking_offline"),
            "resumed_from": (result.get("checkpoints") or {}).get("resumed_from"),
        }
        if stage == "evaluate":
            evaluation = result
            registered = result.get("registered_model")
    summary: dict[str, Any] = {
        "run_id": run_id,
        "seconds": seconds,
        "stages": stages,
        "bucket": f"s3://{bucket}/runs/{run_id}/",
        "s3_endpoint": os.environ.get("DFKA_S3_ENDPOINT", ""),
        "registered_model": registered,
    }
    if evaluation is not None:
        summary.update(
            metrics=evaluation["metrics"],
            results=evaluation["results"],
            markdown=evaluation["markdown"],
            verdict=evaluation.get("verdict"),
        )
    if (link := _mlflow_link(cfg.experiment, run_id, "pipeline")) is not None:
        summary["mlflow"] = link
    return summary


def _mlflow_link(experiment: str, run_id: str, kind: str) -> dict[str, str] | None:
    """The run's parent MLflow run (``kind``: pipeline or sweep) and its URL; ``None`` without MLflow."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    with contextlib.suppress(Exception):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        parent = find_parent(client, experiment, run_id, kind)
        if parent:
            url = run_url(uri, experiment_id(client, experiment), parent)
            return {"experiment": experiment, "parent_run_id": parent, "url": url}
    return None


def collect_sweep(
    cfg: ExperimentConfig, run_id: str, bucket: str, root: Path, seconds: float
) -> dict[str, Any]:
    """The gather step's comparison and the sweep's MLflow run."""
    from dfka.stages.sweep import GATHER_STAGE

    gathered = _stage_result(bucket, run_id, root, GATHER_STAGE, time.time() - seconds - 1) or {}
    summary: dict[str, Any] = {
        "run_id": run_id,
        "sweep": True,
        "seconds": seconds,
        "rows": gathered.get("rows", []),
        "groups": gathered.get("groups", []),
        "markdown": gathered.get("markdown"),
        "bucket": f"s3://{bucket}/runs/{run_id}/",
        "s3_endpoint": os.environ.get("DFKA_S3_ENDPOINT", ""),
        "stages": {},
    }
    if (link := _mlflow_link(cfg.experiment, run_id, "sweep")) is not None:
        summary["mlflow"] = link
    return summary


def render_sweep(summary: dict[str, Any]) -> str:
    lines = ["", summary.get("markdown") or "(no comparison: the gather step did not publish one)", ""]
    lines.append(f"sweep (kfp.local, end to end): {summary['seconds']:.1f} s")
    if summary.get("mlflow"):
        m = summary["mlflow"]
        lines.append(f"MLflow:  {m['url']}  (experiment {m['experiment']}; one child run per variant)")
    endpoint = f"  (S3 endpoint {summary['s3_endpoint']})" if summary.get("s3_endpoint") else ""
    lines.append(
        f"bucket:  {summary['bucket']}{endpoint}  (variants under {summary['bucket'].rstrip('/')}-<variant>/)"
    )
    browse = StackPorts.browse_url(summary.get("s3_endpoint", ""), summary["bucket"].removeprefix("s3://"))
    if browse and summary.get("rows"):
        lines.append(f"report:  {browse}gather-sweep/report.html")
    return "\n".join(lines)


def render(summary: dict[str, Any]) -> str:
    if summary.get("sweep"):
        return render_sweep(summary)
    lines = ["", summary.get("markdown") or "(no results: the evaluate stage did not publish any)", ""]
    lines.append(f"{'stage':<30} {'stage wall':>11} {'process':>9} {'main loop':>10}")
    for stage, s in summary["stages"].items():
        if s.get("cached"):
            lines.append(f"{stage:<30} {'cached':>11}")
            continue

        def sec(v: Any) -> str:
            return f"{v:.1f} s" if isinstance(v, (int, float)) else "–"

        lines.append(
            f"{stage:<30} {sec(s['seconds']):>11} {sec(s['process_seconds']):>9} {sec(s['loop_seconds']):>10}"
        )
    lines.append(f"{'pipeline (kfp.local, end to end)':<30} {summary['seconds']:>9.1f} s")
    lines.append("")
    if summary.get("verdict"):
        lines += [summary["verdict"], ""]
    if summary.get("mlflow"):
        m = summary["mlflow"]
        lines.append(f"MLflow:  {m['url']}  (experiment {m['experiment']})")
    if summary.get("registered_model"):
        r = summary["registered_model"]
        aliases = f", aliases {', '.join(r['aliases'])}" if r.get("aliases") else ""
        lines.append(f"model:   {r['name']} version {r['version']}{aliases}  ({r['model_uri']})")
    offline = [s["tracking_offline"] for s in summary["stages"].values() if s.get("tracking_offline")]
    if offline:
        lines.append("MLflow was unreachable during the run; the metrics are kept in:")
        lines += [f"         {path}" for path in offline]
        lines.append("         upload them with `dfka tracking sync` once the server is back")
    endpoint = f"  (S3 endpoint {summary['s3_endpoint']})" if summary.get("s3_endpoint") else ""
    lines.append(f"bucket:  {summary['bucket']}{endpoint}")
    report = f"{summary['bucket']}evaluate/report.html"
    browse = StackPorts.browse_url(summary.get("s3_endpoint", ""), summary["bucket"].removeprefix("s3://"))
    if browse:  # the local stack: a browser gets 403 from the S3 URL, the filer serves the same objects
        lines.append(f"browse:  {browse}")
        report = f"{browse}evaluate/report.html"
    if summary.get("results"):
        lines.append(f"report:  {report}")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run_local", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True, help="experiment config, e.g. configs/demo.yaml")
    parser.add_argument(
        "--local-root",
        help="kfp.local output folder (default: pipeline.local_root or $DFKA_HOME/pipeline-runs)",
    )
    parser.add_argument("--run-id", help="run id (default local-<time>-<random>)")
    parser.add_argument("--results-json", help="also write the summary here")
    parser.add_argument(
        "--verbose", action="store_true", help="stream the stages' logs instead of writing them to a file"
    )
    parser.add_argument("--sweep", action="store_true", help="run the config's sweep: variants")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get(PARENT_PID_ENV, "").isdigit():  # started by `dfka pipeline run`: die with it
        die_with_parent(int(os.environ.pop(PARENT_PID_ENV)))
    try:
        summary = run(
            args.config,
            local_root=args.local_root,
            run_id=args.run_id,
            verbose=args.verbose,
            sweep=args.sweep,
        )
    except DfkaError as err:
        print(redact(f"error: {err}"), file=sys.stderr)
        return 2
    except RuntimeError as err:  # kfp.local: "Pipeline 'dfka' finished with status FAILURE ..."
        print(redact(f"error: {err}"), file=sys.stderr)
        return 1
    print(render(summary))
    if args.results_json:
        Path(args.results_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
