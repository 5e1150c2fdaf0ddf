"""One benchmark job = one (method, seed): load the cached teachers, train the method, score its final model.

Jobs take and return plain data (:class:`JobSpec`, :class:`JobResult`), so the runner can execute them
in-process or in separate worker processes (``--jobs N``) alike. Every job sets its torch thread count
explicitly. Data-free methods run entirely inside :func:`~dfka.data.data_free`, so any attempt to read
training images (by the method or anything it calls) raises :class:`~dfka.errors.DataFreeViolation`;
``kd-real`` and ``layerwise`` get their unlabeled training images loaded here, outside the guard.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.run import StageReport, teacher_set_from_bundles
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule
from dfka.baselines.dafl import train_dafl
from dfka.baselines.dfad import train_dfad
from dfka.baselines.kd_real import train_kd_real
from dfka.baselines.layerwise import train_layerwise
from dfka.baselines.noise import train_noise
from dfka.bench.config import DATA_FREE, WITH_DATA, BenchmarkConfig
from dfka.bench.evaluate import (
    PROBE_IMAGES,
    PROBE_POINTS,
    agreement,
    load_eval_set,
    probe_score,
)
from dfka.bundles import TeacherBundle, load_bundle
from dfka.data.guard import data_free
from dfka.engine.probe import TimeProbe, probing
from dfka.evaluation import EvalSet, evaluate_model, evaluate_teachers
from dfka.models import count_flops, count_params
from dfka.runtime import pick_device, set_threads

log = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, float], int], None]
GRID_SAMPLES = 64


# --- teachers -----------------------------------------------------------------------------------------


def teacher_root(cfg: BenchmarkConfig) -> Path:
    from dfka.settings import dfka_home

    return Path(cfg.teacher_cache) if cfg.teacher_cache else dfka_home() / "bench" / "teachers"


def prepare_teachers(
    cfg: BenchmarkConfig, *, threads: int | None = None, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Train each teacher once: bundles live at ``<root>/<name>-<recipe sha[:12]>`` and are reused while
    the recipe (dataset, labels, arch, epochs, seed, ...) is unchanged. Returns per-teacher records."""
    from dfka.teachers import cached_manifest, recipe_for, recipe_sha, train_teacher

    root = teacher_root(cfg)
    out: dict[str, dict[str, Any]] = {}
    for zoo in cfg.teachers:
        recipe = recipe_for(zoo)
        bundle = root / f"{zoo.name}-{recipe_sha(recipe)[:12]}"
        manifest = cached_manifest(str(bundle), recipe)
        cached = manifest is not None
        if manifest is None:
            log.info("training teacher %s -> %s", zoo.name, bundle)
            manifest = train_teacher(recipe, str(bundle), threads=threads, progress=progress)
        out[zoo.name] = {
            "bundle": str(bundle),
            "cached": cached,
            "labels": list(manifest.labels),
            "arch": dict(manifest.arch),
            "task": manifest.task,
            "recipe_sha256": manifest.training.get("recipe_sha256"),
            "weights_sha256": manifest.weights.sha256,
            "train_seconds": manifest.metrics.get("train_seconds"),
            "test_metrics": {k: v for k, v in manifest.metrics.items() if k.startswith("test_")},
            "epochs": manifest.training.get("epochs"),
        }
    return out


def load_teachers(
    cfg: BenchmarkConfig, teacher_dirs: dict[str, str], rule: str
) -> tuple[list[TeacherBundle], TeacherSet, UnionRule]:
    bundles = [load_bundle(teacher_dirs[t.name]) for t in cfg.teachers]
    teachers = teacher_set_from_bundles(bundles, cfg.label_set())
    return bundles, teachers, UnionRule(teachers, rule)


def reference_metrics(
    cfg: BenchmarkConfig, teacher_dirs: dict[str, str]
) -> tuple[dict[str, Any], np.ndarray]:
    """Each teacher on its own labels, the ensemble on the union and per teacher, the teachers' cost;
    and the ensemble's test scores (every job's ``agreement`` is measured against them)."""
    from dfka.baselines.ensemble import TeacherEnsemble

    rule = cfg.amalgamation_config(seed=0, threads=None).union.rule
    _, teachers, union = load_teachers(cfg, teacher_dirs, rule)
    ev = load_eval_set(cfg.dataset, teachers, cfg.task, cfg.eval_split)
    metrics, scores = evaluate_model(TeacherEnsemble(teachers, union), ev)
    report = teachers.report()
    reference = {
        "ensemble": metrics,
        "teachers": evaluate_teachers(teachers, ev),
        "teachers_params": report["params_total"],
        "teachers_flops": report["flops_total"],
        "per_teacher": {
            n: {"params": t["params"], "flops": t["flops"]} for n, t in report["teachers"].items()
        },
        "test_images": len(ev),
        "subtask_images": {n: len(s.index) for n, s in ev.subtasks.items()},
        "rule": rule,
        "probe": _probe_reference(cfg, teachers, union),
    }
    return reference, scores.numpy()


def load_probe_set(cfg: BenchmarkConfig, teachers: TeacherSet) -> EvalSet:
    """The images the accuracy-vs-time curves are scored on: the dev set's first ``PROBE_IMAGES``
    (training-split images, so never the test split; loaded outside the data-free guard, only scored)."""
    return load_eval_set(cfg.dataset, teachers, cfg.task, "dev", limit=PROBE_IMAGES)


def _probe_reference(cfg: BenchmarkConfig, teachers: TeacherSet, union: UnionRule) -> dict[str, Any]:
    from dfka.baselines.ensemble import TeacherEnsemble

    probe = load_probe_set(cfg, teachers)
    metrics, _ = evaluate_model(TeacherEnsemble(teachers, union), probe)
    return {
        "split": "dev",
        "images": len(probe),
        "points": PROBE_POINTS,
        "ensemble": metrics[probe.metric],
    }


def ensemble_result(seed: int, reference: dict[str, Any], threads: int | None) -> JobResult:
    """The ``ensemble`` row: the reference numbers (it trains nothing; the same for every seed)."""
    return JobResult(
        "ensemble",
        seed,
        "ok",
        metrics={**reference["ensemble"], "agreement": 1.0},
        params=int(reference["teachers_params"]),
        flops=int(reference["teachers_flops"]),
        threads=threads,
    )


# --- jobs -----------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    benchmark: dict[str, Any]  # BenchmarkConfig.model_dump(by_alias=True)
    method: str
    seed: int
    teacher_dirs: dict[str, str]
    out_dir: str
    threads: int | None
    budget_minutes: float
    reference_budget_minutes: float
    progress: bool = False
    reference_scores: np.ndarray | None = None  # the ensemble's test scores, for ``agreement``


@dataclass
class JobResult:
    method: str
    seed: int
    status: str  # ok | failed
    metrics: dict[str, float] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: int | None = None
    flops: int | None = None
    samples_file: str | None = None
    threads: int | None = None
    budget_minutes: float | None = None
    seconds_wall: float = 0.0
    error: str | None = None
    history: list[tuple[dict[str, float], int]] = field(default_factory=list)
    #: union metric on the probe set against training wall-clock: {"seconds": [...], "values": [...]}
    curve: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Trained:
    model: nn.Module  # pixels in [0, 1] -> Y_cst scores
    stages: dict[str, StageReport]
    samples: torch.Tensor | None = None  # a few training inputs, for the sample grid


@dataclass
class JobContext:
    cfg: BenchmarkConfig
    amal: AmalgamationConfig
    bundles: list[TeacherBundle]
    teachers: TeacherSet
    union: UnionRule
    budget: Budget
    reference_budget: Budget
    device: torch.device
    on_metrics: MetricsCallback | None
    progress: bool
    train_images: torch.Tensor | None = None


@torch.no_grad()
def generator_samples(
    generator: nn.Module, latent_dim: int, n: int = GRID_SAMPLES, seed: int = 0
) -> torch.Tensor:
    """``n`` images from a plain generator, BatchNorm in batch-statistics mode as it was trained."""
    z = torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))
    generator.train()
    return generator(z.to(next(generator.parameters()).device)).cpu()


def _ensemble(ctx: JobContext) -> Trained:
    from dfka.baselines.ensemble import build_ensemble

    model, _ = build_ensemble(ctx.teachers, ctx.union)
    return Trained(model, {})


def _dfka(ctx: JobContext) -> Trained:
    from dfka.amalgamation.run import amalgamate

    result = amalgamate(ctx.bundles, ctx.amal, on_metrics=ctx.on_metrics, progress=ctx.progress)
    samples = result.bank.tensors["image"][:GRID_SAMPLES].float()
    return Trained(result.targetnet, dict(result.stages), samples)


def paper_config(amal: AmalgamationConfig) -> AmalgamationConfig:
    """The same run with ``preset: paper``: the Group-Stack Dual-GAN without dfka's additions, its budget
    re-split over the stages the paper has."""
    return AmalgamationConfig.model_validate({**amal.model_dump(exclude_unset=True), "preset": "paper"})


def _dfka_paper(ctx: JobContext) -> Trained:
    return _dfka(replace(ctx, amal=paper_config(ctx.amal)))


@dataclass(frozen=True)
class Baseline:
    """How the bench trains one baseline of :mod:`dfka.baselines`. Every trainer is called as
    ``train(teachers, union, amal, budget[, train_images], options=..., device=..., on_metrics=...,
    progress=...)``: the methods in :data:`~dfka.bench.config.WITH_DATA` also get the real training
    images, and the reference budget instead of the data-free one."""

    train: Callable[..., tuple[Any, ...]]
    options: str  # its field of BenchmarkConfig.baselines
    #: the sample grid, from what the trainer returns between the student and its report(s)
    samples: Callable[[JobContext, Any], torch.Tensor] | None = None
    #: the trainer returns its stage reports (else one report: the ``train`` stage)
    stages: bool = False


def _generator_grid(ctx: JobContext, generator: nn.Module) -> torch.Tensor:
    return generator_samples(generator, ctx.amal.gan.latent_dim)


def _source_grid(ctx: JobContext, source: Callable[[int], torch.Tensor]) -> torch.Tensor:
    return source(GRID_SAMPLES)


BASELINES: dict[str, Baseline] = {
    "dafl": Baseline(train_dafl, "dafl", samples=_generator_grid),
    "dfad": Baseline(train_dfad, "dfad", samples=_generator_grid),
    "noise": Baseline(train_noise, "noise", samples=_source_grid),
    "kd-real": Baseline(train_kd_real, "kd_real"),
    "layerwise": Baseline(train_layerwise, "layerwise", stages=True),
}


def _baseline(method: str, ctx: JobContext) -> Trained:
    spec = BASELINES[method]
    if method in WITH_DATA:
        assert ctx.train_images is not None
        data: tuple[Any, ...] = (ctx.reference_budget, ctx.train_images)
    else:
        data = (ctx.budget,)
    student, *middle, report = spec.train(
        ctx.teachers,
        ctx.union,
        ctx.amal,
        *data,
        options=getattr(ctx.cfg.baselines, spec.options),
        device=ctx.device,
        on_metrics=ctx.on_metrics,
        progress=ctx.progress,
    )
    samples = spec.samples(ctx, *middle) if spec.samples is not None else None
    return Trained(student, report if spec.stages else {"train": report}, samples)


TRAINERS: dict[str, Callable[[JobContext], Trained]] = {
    "ensemble": _ensemble,
    "dfka": _dfka,
    "dfka-paper": _dfka_paper,
    **{method: functools.partial(_baseline, method) for method in BASELINES},
}


def load_train_images(cfg: BenchmarkConfig) -> torch.Tensor:
    """Real training images of Y_cst's labels, as uint8 ``(N, C, H, W)``; their labels are dropped here."""
    from dfka.data import load_split

    train = load_split(cfg.dataset, "train", labels=cfg.label_set(), task=cfg.task)
    return torch.from_numpy(np.ascontiguousarray(train.images))


def train_method(ctx: JobContext, method: str) -> Trained:
    """Train ``method``; data-free methods entirely inside the data-free guard."""
    trainer = TRAINERS[method]
    if method in DATA_FREE:
        with data_free(f"benchmark {ctx.cfg.name}: {method}"):
            return trainer(ctx)
    return trainer(ctx)


def stage_dicts(stages: dict[str, StageReport]) -> dict[str, dict[str, Any]]:
    return {name: report.as_dict() for name, report in stages.items()}


def run_job(spec: JobSpec, on_metrics: MetricsCallback | None = None) -> JobResult:
    """Run one (method, seed) and score its final model; failures are returned, not raised."""
    started = time.perf_counter()
    budget = spec.reference_budget_minutes if spec.method in WITH_DATA else spec.budget_minutes
    result = JobResult(spec.method, spec.seed, "failed", budget_minutes=budget)  # the budget it runs under
    history = result.history

    def record(metrics: dict[str, float], step: int) -> None:
        history.append((dict(metrics), step))
        if on_metrics is not None:
            on_metrics(metrics, step)

    try:
        result.threads = set_threads(spec.threads)
        cfg = BenchmarkConfig.model_validate(spec.benchmark)
        amal = cfg.amalgamation_config(spec.seed, result.threads, spec.budget_minutes)
        device = pick_device(amal.device)
        bundles, teachers, union = load_teachers(cfg, spec.teacher_dirs, amal.union.rule)
        ev = load_eval_set(cfg.dataset, teachers, cfg.task, cfg.eval_split)
        ctx = JobContext(
            cfg=cfg,
            amal=amal,
            bundles=bundles,
            teachers=teachers.to(device),
            union=union.to(device),
            budget=Budget(seconds=60 * spec.budget_minutes),
            reference_budget=Budget(seconds=60 * spec.reference_budget_minutes),
            device=device,
            on_metrics=record,
            progress=spec.progress,
            train_images=load_train_images(cfg) if spec.method in WITH_DATA else None,
        )
        probe = TimeProbe(60 * budget / PROBE_POINTS, probe_score(load_probe_set(cfg, teachers)))
        try:
            with probing(probe):
                trained = train_method(ctx, spec.method)
            if not probe.values:  # no loop trained a complete model (preset paper: no fine-tune)
                probe.maybe(trained.model, force=True)
        finally:
            result.curve = probe.curve()
        _score(result, trained, teachers, union, ev, spec)
        result.status = "ok"
    except Exception as err:  # one failed job must not lose the other jobs' results
        log.error("%s seed %d failed: %s", spec.method, spec.seed, err)
        result.error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"
    result.seconds_wall = time.perf_counter() - started
    return result


def _score(
    result: JobResult, trained: Trained, teachers: TeacherSet, union: UnionRule, ev: EvalSet, spec: JobSpec
) -> None:
    from dfka.baselines.ensemble import TeacherEnsemble

    model = trained.model.cpu().eval()
    metrics, scores = evaluate_model(model, ev)
    if spec.reference_scores is not None:
        reference = torch.from_numpy(spec.reference_scores)
    else:
        _, reference = evaluate_model(TeacherEnsemble(teachers.cpu(), union.cpu()), ev)
    metrics["agreement"] = agreement(scores, reference, ev.task)
    result.metrics = metrics
    result.stages = stage_dicts(trained.stages)
    if spec.method == "ensemble":
        report = teachers.report()
        result.params, result.flops = int(report["params_total"]), int(report["flops_total"])
    else:
        result.params = count_params(model)
        result.flops = count_flops(model, tuple(teachers.input_shape))
    if trained.samples is not None:
        name = BenchmarkConfig.model_validate(spec.benchmark).name
        path = Path(spec.out_dir) / "samples" / f"{name}-{spec.method}-seed{spec.seed}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, trained.samples.detach().float().cpu().numpy().astype(np.float16), allow_pickle=False)
        result.samples_file = str(path.relative_to(spec.out_dir))
