"""Stages 1-3 with artifacts between them: GAN, sample export, dual-generator blocks, regroup.

Each function reads its inputs from local folders or ``s3://`` URIs, calls the engine
(:mod:`dfka.amalgamation.run`) inside the data-free guard, writes its output folder and returns a small
result dict. ``dfka.amalgamation.run.amalgamate`` is the same chain in one process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Any

import torch

from dfka import storage
from dfka.amalgamation.artifacts import gan_report, load_dual, load_gan, save_dual, save_gan
from dfka.amalgamation.config import AmalgamationConfig
from dfka.amalgamation.regroup import TargetNet, save_targetnet
from dfka.amalgamation.run import (
    StageReport,
    regroup,
    remaining_budget,
    sample_bank,
    train_blocks,
    train_gan,
)
from dfka.amalgamation.samples import (
    SAMPLES_MANIFEST,
    SampleBank,
    Sampler,
    export_bank,
    iter_shards,
    read_bank,
    read_manifest,
)
from dfka.amalgamation.stage1 import AmalgamatingGAN
from dfka.data import data_free
from dfka.engine.checkpoint import Checkpoints
from dfka.models import count_flops, count_params
from dfka.stages._common import (
    TeacherSetArtifact,
    ensure_dir,
    finish,
    load_teacher_set,
    log_grid,
    report_metrics,
    restore_routing,
    sample_grid_file,
    samples_location,
    stage_checkpoints,
    union_scores,
    write_location,
)
from dfka.stages.context import RunContext
from dfka.stages.registry import log_targetnet, model_name
from dfka.tracking import TrackingRun

log = logging.getLogger(__name__)

GAN_STAGE = "train-amalgamating-gan"
EXPORT_STAGE = "export-synthetic-samples"
BLOCKS_STAGE = "train-dual-generator-blocks"
REGROUP_STAGE = "regroup-target-net"
TRAJECTORY = "trajectory"


def _ctx(context: RunContext | None) -> RunContext:
    return context or RunContext(track=False, publish=False)


#: samples-manifest key: the seconds of budget_minutes that stage 1 and the export spent
BUDGET_SPENT = "budget_spent_seconds"


def budget_left(cfg: AmalgamationConfig, extra: dict[str, Any]) -> AmalgamationConfig:
    """Stages 2 and 3 under ``budget_minutes``: what stage 1 and the export left, split as in one
    process (:func:`~dfka.amalgamation.run.remaining_budget`); a step budget is untouched."""
    spent = extra.get(BUDGET_SPENT)
    return remaining_budget(cfg, float(spent)) if spent is not None else cfg


# ---------------------------------------------------------------- stage 1


def train_amalgamating_gan(
    teacher_set: str, out: str, *, context: RunContext | None = None
) -> dict[str, Any]:
    """Stage 1: train the group-stack generator against the frozen teachers.

    Writes ``gan.safetensors``/``gan.json`` and, when ``export.source`` is ``trajectory``, the samples
    kept along the way under ``trajectory/`` (the export stage tops them up), plus a sample grid.
    Checkpoints every ``DFKA_CHECKPOINT_EVERY`` steps and at the end (see :func:`stage_checkpoints`); a
    restarted stage resumes from the last one.
    """
    started = time.perf_counter()
    ctx = _ctx(context)
    ensure_dir(out)
    ts = load_teacher_set(teacher_set)
    cfg = ts.cfg
    checkpoints = stage_checkpoints(GAN_STAGE, out, context, ts)
    with (
        ctx.stage_run(GAN_STAGE, ts.params, ts.config_hash) as tracker,
        data_free("stage 1: amalgamating GAN"),
    ):
        gan, trajectory, stage = train_gan(
            ts.teachers,
            ts.union,
            cfg,
            device=ts.device,
            on_metrics=tracker,
            progress=ctx.progress,
            checkpoints=checkpoints,
        )
        with checkpoints.writing_outputs():
            result = _finish_gan(ts, gan, trajectory, stage, out, context, tracker, checkpoints, started)
        return result


def _finish_gan(
    ts: TeacherSetArtifact,
    gan: AmalgamatingGAN,
    trajectory: SampleBank | None,
    stage: StageReport,
    out: str,
    context: RunContext | None,
    tracker: TrackingRun,
    checkpoints: Checkpoints,
    started: float,
) -> dict[str, Any]:
    """Stage 1's outputs: generator, trajectory samples, sample grid, metrics, result."""
    cfg = ts.cfg
    save_gan(gan, out, extra={"report": stage.as_dict()})
    kept = 0
    if trajectory is not None:
        export_bank(
            trajectory, storage.join(out, TRAJECTORY), shard_size=cfg.export.shard_size, progress=False
        )
        kept = len(trajectory)
    batch = Sampler(gan, seed=cfg.seed + 7, batch_size=256, device=ts.device).sample(256)
    grid = sample_grid_file(ts, batch.image.cpu(), batch.logits, out)
    metrics = {**report_metrics("stage", stage), "samples.trajectory": float(kept)}
    metrics.update({k: v for k, v in stage.extra.items() if isinstance(v, int | float)})
    tracker.log_metrics(metrics)
    log_grid(tracker, grid)
    result = {
        "outputs": {"gan": out},
        "metrics": metrics,
        "report": stage.as_dict(),
        "checkpoints": checkpoints.summary(),
    }
    return finish(GAN_STAGE, out, context, tracker, result, started)


# ---------------------------------------------------------------- export


def export_synthetic_samples(
    teacher_set: str,
    gan: str,
    out: str,
    *,
    samples_uri: str | None = None,
    context: RunContext | None = None,
) -> dict[str, Any]:
    """Draw the synthetic sample set and write it as sharded, checksummed safetensors.

    The shards go to ``samples_uri``, else to ``s3://<bucket>/runs/<run-id>/export-synthetic-samples/samples``
    when an object store is configured, else to ``out/samples``. ``out`` always gets ``location.json``
    (where the shards are), a sample grid and the label balance. The routing calibration (when
    ``union.routing`` is on) and the generator's level widths travel in the manifest's ``extra``.
    """
    started = time.perf_counter()
    ctx = _ctx(context)
    ensure_dir(out)
    ts = load_teacher_set(teacher_set, device="auto")  # a CPU-only stage
    cfg = ts.cfg
    with (
        ctx.stage_run(EXPORT_STAGE, ts.params, ts.config_hash) as tracker,
        data_free("synthetic sample export"),
    ):
        generator = load_gan(gan, ts.teachers, ts.union).to(ts.device)
        trajectory_uri = storage.join(gan, TRAJECTORY)
        trajectory = (
            read_bank(trajectory_uri)
            if storage.exists(storage.join(trajectory_uri, SAMPLES_MANIFEST))
            else None
        )
        bank, stage = sample_bank(
            generator, cfg, trajectory, device=ts.device, progress=ctx.progress, union=ts.union
        )
        extra: dict[str, Any] = {
            "generator_channels": {
                str(lvl): s[0] for lvl, s in enumerate(generator.generator_level_shapes())
            },
            "from_trajectory": len(trajectory) if trajectory is not None else 0,
            # what budget_minutes has paid so far (stage 1's loop and this sampling), so that stages 2
            # and 3 split what is left exactly as `dfka amalgamate` does (run.remaining_budget)
            BUDGET_SPENT: gan_report(gan)["seconds"] + stage.seconds,
        }
        if "routing" in stage.extra:  # calibrated by sample_bank; the later stages restore it
            extra["routing"] = stage.extra["routing"]
        published = ctx.publish_uri(EXPORT_STAGE)
        target = samples_uri or (
            storage.join(published, "samples") if published else storage.join(out, "samples")
        )
        write_started = time.perf_counter()
        manifest = export_bank(
            bank, target, shard_size=cfg.export.shard_size, progress=ctx.progress, extra=extra
        )
        write_seconds = time.perf_counter() - write_started
        write_location(out, target, json.loads(manifest.model_dump_json()))
        logits = {name: bank.tensors[f"logits.{name}"] for name in bank.teacher_names}
        balance = _balance(union_scores(ts, logits), ts.teachers.target_labels)
        take = torch.randperm(len(bank), generator=torch.Generator().manual_seed(cfg.seed))[:2000]
        grid = sample_grid_file(ts, bank.tensors["image"][take], {k: v[take] for k, v in logits.items()}, out)
        metrics = {
            **report_metrics("stage", stage),
            "samples.count": float(len(bank)),
            "samples.from_trajectory": float(extra["from_trajectory"]),
            "samples.write_seconds": write_seconds,
            "samples.shards": float(len(manifest.shards)),
            **balance,
        }
        tracker.log_metrics(metrics)
        log_grid(tracker, grid)
        tracker.set_tags({"dfka.samples": target})
        result = {
            "outputs": {"samples": target, "export": out},
            "metrics": metrics,
            "report": stage.as_dict(),
        }
        return finish(EXPORT_STAGE, out, context, tracker, result, started)


def _balance(scores: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Share of samples per union label, and its normalised entropy (1.0 = perfectly balanced)."""
    counts = torch.bincount(scores.argmax(1), minlength=len(labels)).float()
    share = counts / counts.sum().clamp_min(1)
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(len(labels))) if len(labels) > 1 else 1.0
    return {"samples.balance": entropy, **{f"samples.share.{k}": float(v) for k, v in zip(labels, share)}}


# ---------------------------------------------------------------- stage 2


def train_dual_generator_blocks(
    teacher_set: str, samples: str, out: str, *, context: RunContext | None = None
) -> dict[str, Any]:
    """Stage 2: train the student block by block on the exported samples (``samples`` is the export
    stage's output folder or the shard location itself). Writes ``dual.safetensors``/``dual.json``."""
    started = time.perf_counter()
    ctx = _ctx(context)
    ensure_dir(out)
    ts = load_teacher_set(teacher_set)
    cfg = ts.cfg
    where = samples_location(samples)
    with (
        ctx.stage_run(BLOCKS_STAGE, ts.params, ts.config_hash) as tracker,
        data_free("stage 2: dual-generator block training"),
    ):
        extra = restore_routing(ts, where)
        cfg = budget_left(cfg, extra)
        bank = read_bank(where)
        checkpoints = stage_checkpoints(BLOCKS_STAGE, out, context, ts, inputs=_samples_identity(where))
        channels = {int(k): int(v) for k, v in extra["generator_channels"].items()}
        dual, stage = train_blocks(
            ts.teachers,
            ts.union,
            bank,
            cfg,
            channels,
            device=ts.device,
            on_metrics=tracker,
            progress=ctx.progress,
            checkpoints=checkpoints,
        )
        with checkpoints.writing_outputs():
            save_dual(dual, out, channels, extra={"report": stage.as_dict(), "samples": where})
            metrics = report_metrics("stage", stage)
            metrics.update({k: float(v) for k, v in stage.extra.items() if isinstance(v, int | float)})
            tracker.log_metrics(metrics)
            result = {
                "outputs": {"dual": out},
                "metrics": metrics,
                "report": stage.as_dict(),
                "checkpoints": checkpoints.summary(),
            }
            result = finish(BLOCKS_STAGE, out, context, tracker, result, started)
        return result


def _samples_identity(where: str) -> dict[str, Any]:
    """What stage 2 trains on, for its checkpoints: the export's sample count and shard checksums."""
    manifest = read_manifest(where)
    digest = hashlib.sha256("".join(str(s["sha256"]) for s in manifest.shards).encode()).hexdigest()
    return {"samples": manifest.count, "shards_sha256": digest[:16]}


# ---------------------------------------------------------------- stage 3


def regroup_target_net(
    teacher_set: str,
    samples: str,
    dual: str,
    out: str,
    *,
    registered_model_name: str | None = None,
    context: RunContext | None = None,
) -> dict[str, Any]:
    """Stage 3: assemble the TargetNet (optional fine-tune on the samples) and export it.

    ``out`` gets ``targetnet.safetensors`` + ``targetnet.json`` + ``targetnet.torchscript.pt``. With
    tracking on, the TargetNet is also logged as an MLflow model (``pt2``, with an input example and a
    signature) for the evaluation stage to register as ``registered_model_name`` (default
    ``<experiment>-targetnet``) once it has test scores (:mod:`dfka.stages.registry`).
    """
    started = time.perf_counter()
    ctx = _ctx(context)
    ensure_dir(out)
    ts = load_teacher_set(teacher_set)
    cfg = ts.cfg
    where = samples_location(samples)
    with ctx.stage_run(REGROUP_STAGE, ts.params, ts.config_hash) as tracker, data_free("stage 3: regroup"):
        cfg = budget_left(cfg, restore_routing(ts, where))
        model, meta = load_dual(dual, ts.teachers)
        model = model.to(ts.device)
        if cfg.regroup.finetune is not None:
            bank = read_bank(where)
            example = bank.tensors["image"][:8].float()
        else:
            bank = None  # only the fine-tune reads the bank
            example = next(iter_shards(where))["image"][:8].float()
        inputs = {**_samples_identity(where), "dual_sha256": str(meta.get("sha256", ""))[:16]}
        checkpoints = stage_checkpoints(REGROUP_STAGE, out, context, ts, inputs=inputs)
        net, stage = regroup(
            model,
            ts.union,
            bank,  # type: ignore[arg-type]
            cfg,
            device=ts.device,
            on_metrics=tracker,
            progress=ctx.progress,
            checkpoints=checkpoints,
        )
        with checkpoints.writing_outputs():
            result = _finish_regroup(
                ts, net, stage, example, where, out, context, tracker, registered_model_name
            )
            result["checkpoints"] = checkpoints.summary()
            result = finish(REGROUP_STAGE, out, context, tracker, result, started)
        return result


def _finish_regroup(
    ts: TeacherSetArtifact,
    net: TargetNet,
    stage: StageReport,
    example: torch.Tensor,
    where: str,
    out: str,
    context: RunContext | None,
    tracker: TrackingRun,
    registered_model_name: str | None,
) -> dict[str, Any]:
    """Stage 3's outputs: TargetNet weights, TorchScript and manifest, the MLflow model; the result."""
    ctx = _ctx(context)
    net = net.cpu().eval()
    size = {
        "student.params": float(count_params(net)),
        "student.flops": float(count_flops(net, net.input_shape)),
    }
    provenance = {
        "run_id": ctx.run_id if context else None,
        "git_commit": ctx.git_commit,
        "config_hash": ts.config_hash,
        "teachers": ts.doc["config"]["teachers"],
        "samples": where,
    }
    manifest = save_targetnet(net, out, metrics=size, provenance=provenance)
    metrics = {**report_metrics("stage", stage), **size}
    tracker.log_metrics(metrics)
    tracker.log_dict(json.loads(manifest.model_dump_json()), "targetnet/targetnet.json")
    name = registered_model_name or model_name(ctx.experiment)
    logged = log_targetnet(net, example, tracker, ctx.tracking_uri, name, out) if ctx.track else None
    return {
        "outputs": {"target_net": out},
        "metrics": metrics,
        "report": stage.as_dict(),
        "labels": list(net.label_names),
        "registered_model": logged,  # its version comes with the evaluation, which registers it
    }
