"""Stages 1-3 as composable functions, and ``amalgamate`` that chains them in one process.

``dfka.stages`` calls the same functions with artifacts between them (one KFP component each);
``amalgamate`` keeps everything in memory, which is what the CLI and the benchmarks use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.origin import (
    LabelTargets,
    OriginSlots,
    agrees_with_target,
    fit_routing_bias,
    label_targets_of,
    union_trust,
)
from dfka.amalgamation.regroup import FinetuneTrainer, TargetNet
from dfka.amalgamation.routing import calibrate_routing
from dfka.amalgamation.samples import SampleBank, Sampler, TrajectoryCollector
from dfka.amalgamation.stage1 import AmalgamatingGAN, GanTrainer
from dfka.amalgamation.stage2 import BlockTrainer, DualGenerator
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule
from dfka.bundles import TeacherBundle
from dfka.data.guard import data_free
from dfka.engine import distributed as dist
from dfka.engine import fast
from dfka.engine.checkpoint import Checkpoints, Position
from dfka.engine.loop import LoopResult, run_loop
from dfka.errors import ConfigError
from dfka.models import BlockClassifier, build_model, parse_arch
from dfka.models.registry import accepts
from dfka.runtime import pick_device, seed_everything, set_threads

log = logging.getLogger(__name__)
MetricsCallback = Callable[[dict[str, float], int], None]


def teacher_set_from_bundles(
    bundles: Sequence[TeacherBundle],
    target_labels: Sequence[str] | None,
    path: fast.ComputePath = fast.FAST,
) -> TeacherSet:
    names = [b.name for b in bundles]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        from dfka.errors import CompatibilityError

        raise CompatibilityError(
            f"two teachers share the name(s) {dupes}", "give each teacher bundle a unique name"
        )
    return TeacherSet(
        {b.name: b.model for b in bundles},
        {b.name: b.labels for b in bundles},
        {b.name: b.task for b in bundles},
        target_labels,
        path,
    )


def build_student(spec: str, teachers: TeacherSet) -> BlockClassifier:
    """The student from a registry spec; input shape and block count follow the teachers."""
    partial = parse_arch(spec)
    if accepts(partial["arch"], "blocks"):
        partial.setdefault("blocks", teachers.num_blocks)
    first = next(iter(teachers.models.values()))
    return build_model(
        {**partial, "num_outputs": len(teachers.target_labels), "input_shape": list(teachers.input_shape)},
        **first.normalization,
    )


@dataclass
class StageReport:
    """Wall-clock and throughput of one stage (what the closing table shows)."""

    seconds: float
    steps: int = 0
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "steps": self.steps,
            "samples": self.samples,
            "samples_per_second": self.samples_per_second,
            **self.extra,
        }


def checkpointed_loop(
    step_fn: Callable[[int, int], dict[str, torch.Tensor]],
    budget: Budget,
    state: dict[str, Any],
    phase: str,
    checkpoints: Checkpoints | None,
    at: Position | None,
    *,
    block: int = 0,
    data: dict[str, Any] | None = None,
    save_done: bool = True,
    **loop: Any,
) -> LoopResult:
    """:func:`~dfka.engine.loop.run_loop` resumed from checkpoint position ``at`` (``None``: from
    the start), checkpointing ``state`` every ``checkpoints.every`` steps; with ``save_done`` it ends
    with a *done* checkpoint, unless ``at`` already is that one. The one home of the restore → loop →
    save sequence of every training phase (a resumed time budget continues with the time left)."""
    offset = at.seconds if at else 0.0
    result = run_loop(
        step_fn,
        budget,
        start_step=at.step if at else 0,
        elapsed_offset=offset,
        checkpoint=checkpoints.hook(state, phase, block=block, data=data, offset=offset)
        if checkpoints
        else None,
        checkpoint_every=checkpoints.every if checkpoints else 0,
        **loop,
    )
    if save_done and checkpoints is not None and not (at and at.done and at.step == result.steps):
        checkpoints.save(state, Position(phase, result.steps, done=True, seconds=result.seconds))
    return result


def train_gan(
    teachers: TeacherSet,
    union: UnionRule,
    cfg: AmalgamationConfig,
    *,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    student: BlockClassifier | None = None,
    checkpoints: Checkpoints | None = None,
) -> tuple[AmalgamatingGAN, SampleBank | None, StageReport]:
    """Stage 1. Returns the generator (with filters), the trajectory samples kept for the export (when
    ``export.source`` is ``trajectory``) and the report. ``student`` is only the proxy for the adversarial
    term; with ``gan.loss.adv > 0`` and none given, one of ``cfg.student``'s architecture is built here
    (seeded). With ``checkpoints`` it resumes from the last checkpoint and checkpoints every
    ``checkpoints.every`` steps and at the end."""
    with data_free("stage 1: amalgamating GAN"):
        seed_everything(cfg.seed)
        if student is None and cfg.gan.loss.adv > 0:
            student = build_student(cfg.student, teachers).to(device)
        gan = AmalgamatingGAN(teachers, union, cfg.gan, student=student)
        trainer = GanTrainer(gan, cfg.seed, device)
        collector = None
        if cfg.export.source == "trajectory":
            dtype = torch.float16 if cfg.export.dtype == "float16" else torch.float32
            collector = TrajectoryCollector(
                cfg.export.samples, cfg.export.start, seed=cfg.seed + 1, dtype=dtype
            )
            trainer.collector = collector
        state = {"trainer": trainer, **({"collector": collector} if collector is not None else {})}
        at = checkpoints.restore(state) if checkpoints is not None else None
        result = checkpointed_loop(
            trainer.step,
            cfg.gan.budget,
            state,
            "gan",
            checkpoints,
            at,
            desc="stage 1: GAN",
            prefix="gan",
            on_metrics=on_metrics,
            progress=progress,
        )
    report = StageReport(
        result.seconds, result.steps, result.steps * cfg.gan.batch_size, dict(result.metrics)
    )
    return gan, (collector.bank() if collector is not None and collector.seen else None), report


def sample_bank(
    gan: AmalgamatingGAN,
    cfg: AmalgamationConfig,
    trajectory: SampleBank | None = None,
    *,
    device: torch.device,
    progress: bool = True,
    union: UnionRule | None = None,
) -> tuple[SampleBank, StageReport]:
    """The export's samples: stage 1's trajectory reservoir topped up (or replaced, with ``source:
    final``) by fresh samples from the frozen generator; teachers score each image once. With ``union``
    and ``union.routing`` set, the union's routing is calibrated on them (``report.extra["routing"]``).

    With several ranks the bank is the same on every rank: rank 0 samples (a time cap makes the count
    depend on the machine's speed) and sends it to the others; every rank calibrates on it."""
    if dist.process().size == 1:
        bank, report = _sample(gan, cfg, trajectory, device, progress)
    else:
        bank, report = _shared(gan, cfg, trajectory, device, progress)
    if union is not None and cfg.union.routing != "none":
        with data_free("routing calibration"):
            report.extra["routing"] = calibrate_routing(union, bank)
    return bank, report


def _sample(
    gan: AmalgamatingGAN,
    cfg: AmalgamationConfig,
    trajectory: SampleBank | None,
    device: torch.device,
    progress: bool,
) -> tuple[SampleBank, StageReport]:
    with data_free("synthetic sample export"):
        start = time.perf_counter()
        parts = [trajectory] if trajectory is not None and cfg.export.source == "trajectory" else []
        kept = sum(len(p) for p in parts)
        missing = max(0, cfg.export.samples - kept)
        if missing > 0:
            sampler = Sampler(gan, seed=cfg.seed + 1, batch_size=512, device=device)
            dtype = torch.float16 if cfg.export.dtype == "float16" else torch.float32
            # under a time cap, at least enough for one batch of stages 2 and 3 with the trajectory's
            at_least = max(1, max(cfg.blocks.batch_size, cfg.regroup.batch_size) - kept)
            top_up = SampleBank.generate(
                sampler,
                missing,
                dtype=dtype,
                progress=progress,
                seconds=cfg.export_seconds(),
                at_least=at_least,
            )
            missing = len(top_up)
            parts.append(top_up)
        bank = SampleBank.concat(parts)
    seconds = time.perf_counter() - start
    # samples = what this stage generated (its throughput); the bank also holds the trajectory's
    return bank, StageReport(seconds, samples=missing, extra={"bank": len(bank), "from_trajectory": kept})


def _shared(
    gan: AmalgamatingGAN,
    cfg: AmalgamationConfig,
    trajectory: SampleBank | None,
    device: torch.device,
    progress: bool,
) -> tuple[SampleBank, StageReport]:
    """Rank 0's :func:`_sample` on every rank (the bank's layout as JSON, its tensors by broadcast)."""
    layout = tensors = None
    if dist.process().main:
        bank, report = _sample(gan, cfg, trajectory, device, progress)
        tensors = bank.tensors
        layout = {
            "keys": sorted(bank.tensors), "names": bank.teacher_names, "levels": bank.levels,
            "numbers": [report.seconds, report.samples, report.extra["from_trajectory"]],
        }  # fmt: skip
    layout = dist.broadcast_json(layout)
    tensors = dist.broadcast_tensors(tensors, layout["keys"])
    seconds, samples, kept = layout["numbers"]
    bank = SampleBank(tensors, layout["names"], layout["levels"])
    return bank, StageReport(
        seconds, samples=int(samples), extra={"bank": len(bank), "from_trajectory": int(kept)}
    )


def train_blocks(
    teachers: TeacherSet,
    union: UnionRule,
    bank: SampleBank,
    cfg: AmalgamationConfig,
    generator_channels: dict[int, int],
    *,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
) -> tuple[DualGenerator, StageReport]:
    """Stage 2: block ``b = 1..B`` in turn, each with its share of the budget. With ``checkpoints`` it
    resumes from the last checkpoint (skipping finished blocks) and checkpoints every
    ``checkpoints.every`` steps and at the end of each block."""
    with data_free("stage 2: dual-generator block training"):
        seed_everything(cfg.seed + 2)
        student = build_student(cfg.student, teachers)
        dual = DualGenerator(student, teachers, generator_channels)
        rng = torch.Generator().manual_seed(cfg.seed + 2)
        trainer = BlockTrainer(
            dual, union, cfg.blocks, bank.batches(cfg.blocks.batch_size, rng, device), device
        )
        blocks = dual.num_blocks
        shares = cfg.blocks.block_weights or [1.0] * blocks
        if len(shares) != blocks:
            raise ConfigError(f"blocks.block_weights has {len(shares)} entries for {blocks} blocks")
        budgets = _split(cfg.blocks.budget, shares)
        state = {"trainer": trainer, "batches": trainer.batches}
        at = checkpoints.restore(state) if checkpoints is not None else None
        done = at.data if at else {"steps": 0, "seconds": 0.0, "extra": {}}
        total_steps, total_seconds, extra = int(done["steps"]), float(done["seconds"]), dict(done["extra"])
        for b in range(1, blocks + 1):
            if at is not None and (b < at.block or (b == at.block and at.done)):
                continue  # finished before the restart
            resumed = at is not None and b == at.block
            if not resumed:
                trainer.start_block(b)  # a resumed block's optimiser came back with the checkpoint
            so_far = {"steps": total_steps, "seconds": total_seconds, "extra": extra}
            result: LoopResult = checkpointed_loop(
                trainer.step,
                budgets[b - 1],
                state,
                "blocks",
                checkpoints,
                at if resumed else None,
                block=b,
                data=so_far,
                save_done=False,  # a finished block's checkpoint carries the totals, written below
                desc=f"stage 2: block {b}/{blocks}",
                prefix=f"blocks.b{b}",
                on_metrics=on_metrics,
                progress=progress,
                step_offset=total_steps,
            )
            total_steps += result.steps
            total_seconds += result.seconds
            extra[f"blocks.b{b}.steps"] = result.steps
            extra[f"blocks.b{b}.seconds"] = result.seconds
            extra.update(result.metrics)
            if checkpoints is not None:
                so_far = {"steps": total_steps, "seconds": total_seconds, "extra": extra}
                checkpoints.save(state, Position("blocks", result.steps, b, True, result.seconds, so_far))
    report = StageReport(total_seconds, total_steps, total_steps * cfg.blocks.batch_size, extra)
    return dual, report


def regroup(
    dual: DualGenerator,
    union: UnionRule,
    bank: SampleBank,
    cfg: AmalgamationConfig,
    *,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    checkpoints: Checkpoints | None = None,
) -> tuple[TargetNet, StageReport]:
    """Stage 3: assemble the TargetNet; fine-tune end to end when ``regroup.finetune`` is set (resuming
    from and writing ``checkpoints`` like the other training loops, when given)."""
    with data_free("stage 3: regroup"):
        start = time.perf_counter()
        net = TargetNet.from_dual(dual, dual.teachers.label_tasks).to(device)
        steps, extra = 0, {}
        if cfg.regroup.finetune is not None:
            rng = torch.Generator().manual_seed(cfg.seed + 3)
            origin = origin_of(dual.teachers, cfg, bank)
            targets = targets_of(dual.teachers, cfg, bank)
            if targets is not None:
                extra["target_agreement"] = bank_target_agreement(union, bank, targets)
            trust = calibration = None
            if origin is not None:
                trust = bank_union_trust(union, bank, origin)
                if cfg.regroup.origin.calibrate:
                    union, calibration = calibrated_union(union, bank, origin)
                    extra |= {f"union_bias.{name}": b for name, b in calibration.items()}
                    extra["union_trust_calibrated"] = bank_union_trust(union, bank, origin)
            trainer = FinetuneTrainer(
                net,
                union,
                cfg.regroup,
                bank.batches(cfg.regroup.batch_size, rng, device),
                device,
                origin=origin,
                teachers=dual.teachers,
                path=dual.teachers.path,
                union_weight=cfg.regroup.origin.union_kd,
                seed=cfg.seed + 3,
                targets=targets,
            )
            state = {"net": net, "optimizer": trainer.optimizer, "batches": trainer.batches}
            if origin is not None or targets is not None:
                state["trainer"] = trainer
            at = checkpoints.restore(state) if checkpoints is not None else None
            result = checkpointed_loop(
                trainer.step,
                cfg.regroup.finetune,
                state,
                "finetune",
                checkpoints,
                at,
                desc="stage 3: fine-tune",
                prefix="finetune",
                on_metrics=on_metrics,
                progress=progress,
                model=net,
            )
            steps = result.steps
            extra |= dict(result.metrics)
            if trust is not None:
                extra["union_trust"] = trust  # diagnostic: how the raw union routes origin-known samples
    net.eval()
    return net, StageReport(time.perf_counter() - start, steps, steps * cfg.regroup.batch_size, extra)


def origin_of(teachers: TeacherSet, cfg: AmalgamationConfig, bank: SampleBank) -> OriginSlots | None:
    """The slots the bank's samples were generated for, or None when the bank carries no origin."""
    origin = OriginSlots.of(teachers) if cfg.gan.conditional == "auto" else None
    return origin if origin is not None and _conditions(bank, cfg) == origin.size else None


def targets_of(teachers: TeacherSet, cfg: AmalgamationConfig, bank: SampleBank) -> LabelTargets | None:
    """The label targets the bank's samples were generated for, or None when the bank carries none."""
    targets = label_targets_of(teachers, cfg.gan.conditional, cfg.gan.positives)
    return targets if targets is not None and _conditions(bank, cfg) == targets.size else None


def _conditions(bank: SampleBank, cfg: AmalgamationConfig) -> int:
    """How many conditioning entries the bank's latent codes carry beyond the noise."""
    return bank.tensors["z"].shape[1] - cfg.gan.latent_dim


@torch.no_grad()
def bank_target_agreement(union: UnionRule, bank: SampleBank, targets: LabelTargets) -> float:
    """Diagnostic: the share of the bank whose teachers' union (σ > 0.5) gives exactly its target."""
    t = targets.decode(bank.tensors["z"].float())
    return float(agrees_with_target(_bank_scores(union, bank, None), t).float().mean())


#: origin-known samples enough to fit one offset per teacher and read the union's routing
FIT_SAMPLES = 20000


def _bank_scores(union: UnionRule, bank: SampleBank, n: int | None = FIT_SAMPLES) -> torch.Tensor:
    """The union's scores of the bank's first ``n`` samples (all with ``None``), from the stored logits."""
    device = union.multiclass_mask.device
    return union({k: bank.tensors[f"logits.{k}"][:n].float().to(device) for k in bank.teacher_names})


def _bank_slots(bank: SampleBank, origin: OriginSlots) -> torch.Tensor:
    return origin.decode(bank.tensors["z"][:FIT_SAMPLES].float())


def calibrated_union(
    union: UnionRule, bank: SampleBank, origin: OriginSlots
) -> tuple[UnionRule, dict[str, float]]:
    """A copy of ``union`` with per-teacher offsets fitted on the bank's origin-known samples
    (:func:`~dfka.amalgamation.origin.fit_routing_bias`); the shared rule is left as it is."""
    import copy

    with torch.no_grad():
        scores = _bank_scores(union, bank)
    bias = fit_routing_bias(scores, origin, _bank_slots(bank, origin))
    out = copy.deepcopy(union)
    with torch.no_grad():
        for i, name in enumerate(origin.teachers):
            out.bias[out.names.index(name)] += bias[i]
    return out, {name: float(bias[i]) for i, name in enumerate(origin.teachers)}


@torch.no_grad()
def bank_union_trust(union: UnionRule, bank: SampleBank, origin: OriginSlots) -> float:
    """:func:`union_trust` over the whole bank (the teachers' logits are stored with every sample)."""
    return union_trust(_bank_scores(union, bank, None), origin, origin.decode(bank.tensors["z"].float()))


def _split(budget: Budget, shares: Sequence[float]) -> list[Budget]:
    total = sum(shares)
    if budget.steps is not None:
        return [Budget(steps=max(1, round(budget.steps * s / total))) for s in shares]
    return [Budget(seconds=budget.seconds * s / total) for s in shares]


def remaining_budget(cfg: AmalgamationConfig, spent: float) -> AmalgamationConfig:
    """Under a total wall-clock budget (``budget_minutes``), give stages 2 and 3 what stage 1 and the
    export left, in their ``budget_split`` ratio. The export (topping the trajectory bank up from the
    final generator, routing calibration) has no share of its own, so without this its time would come
    on top of the budget: on 56x56 mosaics at a 2-minute budget it took 97 s. Step budgets are untouched."""
    if cfg.budget_minutes is None:
        return cfg
    left = max(0.0, 60 * cfg.budget_minutes - spent)
    shares = cfg.stage_shares()
    total = (shares["blocks"] + shares["finetune"]) or 1.0
    out = cfg.model_copy(deep=True)
    # at least one second each, so that every stage still runs (and reports) when the budget is gone;
    # a stage with no share runs one step
    blocks = shares["blocks"] / total
    out.blocks.budget = Budget(seconds=max(1.0, left * blocks)) if blocks > 0 else Budget(steps=1)
    if cfg.regroup.finetune is not None:
        out.regroup.finetune = Budget(seconds=max(1.0, left * shares["finetune"] / total))
    return out


@dataclass
class AmalgamationResult:
    targetnet: TargetNet
    teachers: TeacherSet
    union: UnionRule
    gan: AmalgamatingGAN
    bank: SampleBank
    stages: dict[str, StageReport]


def check_ranks(cfg: AmalgamationConfig, nproc: int) -> None:
    """Every global batch must split evenly across ``nproc`` ranks; say which one does not, before training."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: needs at least 1 process", "use --nproc 1 (one process) or more")
    if nproc == 1:
        return
    batches = {
        "gan.batch_size": cfg.gan.batch_size,
        "blocks.batch_size": cfg.blocks.batch_size,
        "regroup.batch_size": cfg.regroup.batch_size,
    }
    if cfg.regroup.origin.mix > 0:
        batches["regroup.origin.mix x regroup.batch_size"] = max(
            1, round(cfg.regroup.origin.mix * cfg.regroup.batch_size)
        )
    bad = {k: v for k, v in batches.items() if v % nproc}
    if bad:
        shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise ConfigError(
            f"{shown}: a global batch must split evenly across --nproc {nproc} ranks",
            f"use batch sizes that are multiples of {nproc}, or another --nproc",
        )


def amalgamate(
    bundles: Sequence[TeacherBundle],
    cfg: AmalgamationConfig,
    *,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> AmalgamationResult:
    """Stages 1-3 in one process: GAN, samples, block-wise dual generator, regroup.

    Launched by ``torchrun`` (``dfka amalgamate --nproc N``), every rank runs this chain: the training
    loops split each global batch across the ranks (:mod:`dfka.engine.distributed`), rank 0 draws the
    export's samples and sends them to the others, and every rank returns the same TargetNet."""
    set_threads(cfg.threads)
    device = dist.rank_device(pick_device(cfg.device))
    dist.init_from_env(device)
    teachers = teacher_set_from_bundles(bundles, cfg.target_labels).to(device)
    union = UnionRule(teachers, cfg.union.rule).to(device)
    stages: dict[str, StageReport] = {}
    gan, trajectory, stages["gan"] = train_gan(
        teachers, union, cfg, device=device, on_metrics=on_metrics, progress=progress
    )
    bank, stages["export"] = sample_bank(gan, cfg, trajectory, device=device, progress=progress, union=union)
    cfg = remaining_budget(cfg, stages["gan"].seconds + stages["export"].seconds)
    channels = {level: shape[0] for level, shape in enumerate(gan.generator_level_shapes())}
    dual, stages["blocks"] = train_blocks(
        teachers, union, bank, cfg, channels, device=device, on_metrics=on_metrics, progress=progress
    )
    net, stages["regroup"] = regroup(
        dual, union, bank, cfg, device=device, on_metrics=on_metrics, progress=progress
    )
    return AmalgamationResult(net, teachers, union, gan, bank, stages)
