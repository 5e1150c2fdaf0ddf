"""``run_benchmark``: teachers (cached), reference metrics, then seeds × methods, results and tracking.

Order of work:

1. validate the benchmark and the overrides; record the machine;
2. train or reuse the teachers (outside any data-free block: they are the only thing trained on labels);
3. score each teacher on its own labels and the ensemble on the union (the reference numbers);
4. run the (method, seed) jobs, seed by seed, in this process or in ``jobs`` worker processes with one
   torch thread each; every job in one invocation gets the same thread count, so data-free methods are
   timed alike;
5. after every job: merge it into ``<out>/<name>.json`` and ``.csv`` (so an interrupted run keeps what
   finished) and log it to MLflow as a child of the invocation's run; at the end write the markdown
   table, the accuracy-vs-time plot and the sample grids.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfka.bench.config import KIND, METHODS, BenchmarkConfig, load_benchmark, parse_benchmark
from dfka.bench.jobs import JobResult, JobSpec, ensemble_result, prepare_teachers, reference_metrics, run_job
from dfka.bench.machine import describe, is_clean_commit, machine_info
from dfka.bench.report import write_benchmark_outputs
from dfka.bench.results import open_results, record_run
from dfka.errors import ConfigError, DfkaError
from dfka.evaluation import task_key, teacher_key
from dfka.runtime import env_var

if TYPE_CHECKING:
    from dfka.tracking import Tracker

log = logging.getLogger(__name__)
DEFAULT_OUT = "benchmarks/results"
EXPERIMENT = "dfka-bench"


@dataclass
class BenchmarkRun:
    name: str
    out_dir: Path
    outputs: dict[str, Any]
    results: list[JobResult] = field(default_factory=list)

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if r.status != "ok"]


def parse_list(text: str | Sequence[Any] | None, kind: type = str) -> list[Any] | None:
    """``"0,1,2"`` → ``[0, 1, 2]``; lists pass through; ``None`` stays ``None``."""
    if text is None:
        return None
    items = [str(x).strip() for x in (text.split(",") if isinstance(text, str) else list(text))]
    out = []
    for x in filter(None, items):
        try:
            out.append(kind(x))
        except ValueError:
            raise ConfigError(
                f"{x!r} in {text!r} is not {_KINDS.get(kind, kind.__name__)}",
                "give a comma-separated list, e.g. 0,1,2",
            ) from None
    return out


_KINDS = {int: "a whole number", float: "a number"}


def _with_overrides(
    cfg: BenchmarkConfig,
    seeds: Sequence[int] | None,
    methods: Sequence[str] | None,
    budget_minutes: float | None,
    reference_budget_minutes: float | None,
    eval_split: str | None = None,
) -> BenchmarkConfig:
    raw = cfg.model_dump(by_alias=True, mode="json")
    if eval_split is not None:
        raw["eval_split"] = eval_split
    if seeds is not None:
        raw["seeds"] = list(seeds)
    if methods is not None:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}", f"use any of {', '.join(METHODS)}")
        raw["methods"] = list(methods)
    if budget_minutes is not None:
        raw["budget_minutes"] = budget_minutes
    if reference_budget_minutes is not None:
        raw["reference_budget_minutes"] = reference_budget_minutes
    return parse_benchmark(raw, source=f"benchmark {cfg.name} with overrides")


def _init_worker(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_benchmark(
    name_or_path: str | Path | BenchmarkConfig,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    out_dir: str | Path = DEFAULT_OUT,
    budget_minutes: float | None = None,
    *,
    reference_budget_minutes: float | None = None,
    jobs: int = 1,
    threads: int | None = None,
    eval_split: str | None = None,
    mlflow: bool = True,
    experiment: str = EXPERIMENT,
    progress: bool = True,
) -> BenchmarkRun:
    """Run a benchmark's (method, seed) grid and write its results; see the module docstring.

    ``budget_minutes`` overrides the data-free budget (and the reference budget unless the YAML or
    ``reference_budget_minutes`` sets it). Every job uses ``threads`` torch threads (default: the YAML's
    ``threads``, else 1); with ``jobs > 1`` each job runs in its own worker process. ``eval_split="dev"``
    scores on a fixed subset of the training split instead of the test split (for tuning).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    base = name_or_path if isinstance(name_or_path, BenchmarkConfig) else load_benchmark(name_or_path)
    cfg = _with_overrides(base, seeds, methods, budget_minutes, reference_budget_minutes, eval_split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One thread per job unless asked otherwise: independent 1-thread jobs use small CPUs best
    # (calibration), and multi-threaded OpenMP collapses when other processes share the cores.
    per_job_threads = threads or cfg.threads or 1
    machine = machine_info(per_job_threads, jobs)
    log.info("benchmark %s on %s", cfg.name, describe(machine))
    if not is_clean_commit(machine.get("git")):
        log.warning(
            "code version %s is not a clean commit: `dfka bench report` will refuse these rows unless "
            "--allow-dirty (commit first to publish them)",
            machine.get("git") or "unknown",
        )

    teacher_records = prepare_teachers(cfg, threads=threads or cfg.threads, progress=progress)
    teacher_dirs = {n: r["bundle"] for n, r in teacher_records.items()}
    reference, reference_scores = reference_metrics(cfg, teacher_dirs)
    header = {
        "benchmark": cfg.name,
        "description": cfg.description,
        "config": cfg.model_dump(by_alias=True, mode="json"),
        "task": cfg.task,
        "metric": cfg.metric,
        "label_set": cfg.label_set(),
        "teachers": teacher_records,
        "reference": reference,
        "machine": machine,
    }
    data = open_results(out, header)

    specs = [
        JobSpec(
            benchmark=cfg.model_dump(by_alias=True, mode="json"),
            method=method,
            seed=seed,
            teacher_dirs=teacher_dirs,
            out_dir=str(out),
            threads=per_job_threads,
            budget_minutes=cfg.budget_minutes,
            reference_budget_minutes=cfg.reference_minutes,
            progress=progress and jobs == 1,
            reference_scores=reference_scores,
        )
        for seed in cfg.seeds
        for method in cfg.methods
    ]
    tracker = _start_tracker(cfg, machine, experiment) if mlflow else None
    results: list[JobResult] = []
    started = time.perf_counter()

    def finish(result: JobResult, child: Any = None) -> None:
        results.append(result)
        record_run(out, data, _run_record(result, machine))
        _log_child(tracker, child, cfg, result, reference, machine)
        m = cfg.metric
        if result.status == "ok":
            value = result.metrics.get(m, float("nan"))
            took = sum(s.get("seconds", 0.0) for s in result.stages.values())
            print(
                f"[{len(results)}/{len(specs)}] {cfg.name} {result.method} seed {result.seed}: "
                f"union {m} {100 * value:.2f}% (ensemble {100 * reference['ensemble'][m]:.2f}%), "
                f"{took:.0f} s training",
                flush=True,
            )
        else:
            first = (result.error or "").splitlines()[0]
            print(
                f"[{len(results)}/{len(specs)}] {cfg.name} {result.method} seed {result.seed}: FAILED {first}",
                flush=True,
            )

    status = "FAILED"
    try:
        # the ensemble trains nothing: its rows are the reference numbers scored above
        for spec in [s for s in specs if s.method == "ensemble"]:
            finish(ensemble_result(spec.seed, reference, per_job_threads))
        todo = [s for s in specs if s.method != "ensemble"]
        if jobs == 1:
            for spec in todo:
                child = _child(tracker, spec)
                finish(run_job(spec, on_metrics=child), child)
        elif todo:
            ctx = multiprocessing.get_context("spawn")
            with (
                env_var("OMP_NUM_THREADS", str(per_job_threads)),
                ProcessPoolExecutor(
                    max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(per_job_threads,)
                ) as pool,
            ):
                futures = [pool.submit(run_job, spec) for spec in todo]
                try:
                    for future in as_completed(futures):
                        finish(future.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        status = "FINISHED"
    finally:
        outputs = write_benchmark_outputs(out, cfg.name)
        if tracker is not None:
            for key in ("csv", "markdown", "plot"):
                tracker.log_artifact(outputs[key])
            tracker.log_artifact(out / f"{cfg.name}.json")
            for grid in outputs["grids"]:
                tracker.log_artifact(grid, "samples")
            tracker.log_metrics(
                {
                    "wall_seconds": time.perf_counter() - started,
                    "failed_jobs": sum(r.status != "ok" for r in results),
                }
            )
            tracker.end(status if not any(r.status != "ok" for r in results) else "FAILED")
    return BenchmarkRun(cfg.name, out, outputs, results)


def _run_record(result: JobResult, machine: dict[str, Any]) -> dict[str, Any]:
    record = asdict(result)
    record.pop("history")
    record["kind"] = KIND.get(result.method, "")
    record["machine"] = machine
    record["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


# --- MLflow -----------------------------------------------------------------------------------------------


def _start_tracker(cfg: BenchmarkConfig, machine: dict[str, Any], experiment: str) -> Tracker:
    from dfka.tracking import Tracker

    tracker = Tracker.start(
        experiment,
        f"bench-{cfg.name}",
        tags={
            "dfka.kind": "benchmark",
            "dfka.benchmark": cfg.name,
            "dfka.eval_split": cfg.eval_split,
            "dfka.machine": describe(machine),
        },
    )
    tracker.log_params({"benchmark": cfg.model_dump(by_alias=True, mode="json"), "machine": machine})
    return tracker


def _child(tracker: Tracker | None, spec: JobSpec) -> Tracker | None:
    if tracker is None:
        return None
    return tracker.child(
        f"{spec.method}-seed{spec.seed}",
        tags={"dfka.kind": "benchmark-run", "dfka.method": spec.method, "dfka.seed": spec.seed},
    )


def _log_child(
    tracker: Tracker | None,
    child: Tracker | None,
    cfg: BenchmarkConfig,
    result: JobResult,
    reference: dict[str, Any],
    machine: dict[str, Any],
) -> None:
    """One child run per (method, seed); the same param and final-metric keys for every method."""
    if tracker is None:
        return
    if child is None:  # ran in a worker: replay its training curves now
        child = tracker.child(
            f"{result.method}-seed{result.seed}",
            tags={"dfka.kind": "benchmark-run", "dfka.method": result.method, "dfka.seed": result.seed},
        )
        for metrics, step in result.history:
            child.log_metrics(metrics, step)
    m = cfg.metric
    child.log_params(
        {
            "benchmark": cfg.name,
            "method": result.method,
            "kind": KIND.get(result.method, ""),
            "seed": result.seed,
            "dataset": cfg.dataset,
            "eval_split": cfg.eval_split,
            "student": cfg.student,
            "target_labels": ",".join(cfg.label_set()),
            "teachers": ",".join(t.name for t in cfg.teachers),
            "budget_minutes": result.budget_minutes,
            "threads": result.threads,
            "jobs": machine.get("jobs"),
        }
    )
    stages = result.stages
    seconds = sum(s.get("seconds", 0.0) for s in stages.values())
    samples = sum(s.get("samples", 0) for s in stages.values())
    # the evaluate stage's names (dfka.evaluation): <split>.student.acc, <split>.teacher.<t>.acc, ...
    split = cfg.eval_split
    final: dict[str, Any] = {
        f"{split}.student.{m}": result.metrics.get(m),
        f"{split}.ensemble.{m}": reference["ensemble"][m],
        "agreement": result.metrics.get("agreement"),
        "params": result.params,
        "flops": result.flops,
        "params_ratio": (result.params or 0) / reference["teachers_params"],
        "flops_ratio": (result.flops or 0) / reference["teachers_flops"],
        "seconds.total": seconds,
        "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        "ok": float(result.status == "ok"),
    }
    for t in cfg.teachers:
        task, own = task_key(t.name, m), teacher_key(t.name, m)
        final[f"{split}.student.{task}"] = result.metrics.get(task)
        final[f"{split}.ensemble.{task}"] = reference["ensemble"].get(task)
        final[f"{split}.{own}"] = reference["teachers"].get(own)
    child.log_metrics({k: v for k, v in final.items() if v is not None})
    child.log_dict({"stages": stages, "metrics": result.metrics, "error": result.error}, "result.json")
    child.end("FINISHED" if result.status == "ok" else "FAILED")


def failure_summary(run: BenchmarkRun) -> DfkaError | None:
    if not run.failed:
        return None
    lines = "; ".join(f"{r.method} seed {r.seed}: {(r.error or '').splitlines()[0]}" for r in run.failed)
    return DfkaError(
        f"{len(run.failed)} of {len(run.results)} benchmark jobs failed ({lines})",
        f"see {run.out_dir / (run.name + '.json')} for tracebacks; re-run just those with --methods/--seeds",
    )
