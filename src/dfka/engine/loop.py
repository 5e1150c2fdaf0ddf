"""One training-loop contract for every stage.

A step function takes ``(step, total_steps)`` and returns a dict with ``loss`` and its named parts
(tensors, detached). The loop owns the budget, the progress bar, metric callbacks and checkpoint calls:

* a budget in steps is exact and reproducible; a budget in seconds ends on time, with the schedule's
  length re-estimated from the measured step rate, and the run records how many steps it took;
* metrics are averaged over ``log_every`` steps and only then turned into Python floats (no per-step
  ``.item()`` syncs);
* the callback receives ``{"<prefix>.<name>": value}`` and the global step, which is what
  ``dfka.tracking.Tracker`` consumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from dfka.engine import distributed as dist
from dfka.engine.probe import active_probe
from dfka.errors import TrainingDiverged
from dfka.progress import bar as progress_bar

StepFn = Callable[[int, int], dict[str, torch.Tensor]]
MetricsCallback = Callable[[dict[str, float], int], None]
CheckpointFn = Callable[[int], None]

WARMUP_STEPS = 10


class Budget(Protocol):
    """How long a loop runs: ``steps`` or ``seconds`` (one of them set), e.g.
    :class:`dfka.amalgamation.config.Budget`. The engine reads nothing else of the method's config."""

    @property
    def steps(self) -> int | None: ...

    @property
    def seconds(self) -> float | None: ...


@dataclass
class LoopResult:
    steps: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


def run_loop(
    step_fn: StepFn,
    budget: Budget,
    *,
    desc: str,
    prefix: str,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    log_every: int = 25,
    start_step: int = 0,
    checkpoint: CheckpointFn | None = None,
    checkpoint_every: int = 0,
    step_offset: int = 0,
    elapsed_offset: float = 0.0,
    model: nn.Module | None = None,
) -> LoopResult:
    """Run ``step_fn`` until the budget is spent; ``start_step`` resumes a cut-off run, and
    ``elapsed_offset`` (the loop seconds spent before the cut) makes a resumed time budget continue with
    the remaining time; ``LoopResult.seconds`` then includes it.

    With a time budget the schedule length is re-estimated from the measured step rate as the run goes
    (``step · seconds / elapsed``), so the learning rate reaches its floor when the time runs out.

    ``model`` is the complete model this loop trains (pixels to Y_cst scores), if it has one: an active
    :class:`~dfka.engine.probe.TimeProbe` scores it on its ticks, outside the time budget.

    Launched on several ranks (:mod:`dfka.engine.distributed`), the loop runs sharded: rank 0 decides
    when a time budget ends and how long the schedule is, every logged value is the mean over the
    ranks, a non-finite loss on any rank stops them all, and only rank 0 shows progress and calls
    ``on_metrics`` (checkpoints are written by rank 0, see :class:`~dfka.engine.checkpoint.Checkpoints`).
    """
    with dist.sharded():
        return _run_loop(
            step_fn, budget, desc=desc, prefix=prefix, on_metrics=on_metrics, progress=progress,
            log_every=log_every, start_step=start_step, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, step_offset=step_offset, elapsed_offset=elapsed_offset,
            model=model,
        )  # fmt: skip


def _run_loop(
    step_fn: StepFn,
    budget: Budget,
    *,
    desc: str,
    prefix: str,
    on_metrics: MetricsCallback | None,
    progress: bool,
    log_every: int,
    start_step: int,
    checkpoint: CheckpointFn | None,
    checkpoint_every: int,
    step_offset: int,
    elapsed_offset: float,
    model: nn.Module | None,
) -> LoopResult:
    main = dist.world().main
    if not main:
        progress, on_metrics = False, None
    by_time = budget.steps is None
    if by_time and budget.seconds is None:
        raise ValueError("a budget needs steps or seconds")
    total = budget.steps or 10**9
    probe = active_probe() if model is not None else None
    started = time.perf_counter()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    last: dict[str, float] = {}
    bar = progress_bar(
        total=None if by_time else total,
        initial=start_step,
        desc=desc,
        progress=progress,
        leave=False,
        unit="step",
        mininterval=0.5,
    )
    step = start_step
    # the first step whose loss was not finite, kept on the device (no per-step sync); read at every
    # flush and before every checkpoint, so a diverged state is never checkpointed
    first_bad: torch.Tensor | None = None
    saved = start_step if start_step else None

    def check(upto: int) -> None:
        bad = dist.max_over_ranks(-1 if first_bad is None else int(first_bad))
        if bad >= 0:
            bar.close()
            where = f"step {saved} of this loop is intact" if saved is not None else "none was written yet"
            raise TrainingDiverged(
                f"{desc}: the loss became NaN or infinite at step {step_offset + bad + 1} (checked up to "
                f"step {step_offset + upto}); the last checkpoint: {where}",
                "lower the learning rate or the loss weights (or change the seed) and run again; with "
                "checkpoints, the same run id resumes from the last good one",
            )

    while True:
        elapsed = elapsed_offset + time.perf_counter() - started
        if by_time:
            stop = elapsed >= budget.seconds
            if not stop and step >= WARMUP_STEPS:
                total = max(step + 1, math.ceil(step * budget.seconds / max(elapsed, 1e-9)))
            stop, total = _agreed(stop, total)
            if stop:
                break
        elif step >= total:
            break
        out = step_fn(step, total)
        if "loss" in out:
            loss = out["loss"].detach()
            if first_bad is None:
                first_bad = torch.tensor(-1, device=loss.device)
            nonfinite = ~torch.isfinite(loss).all()
            first_bad = torch.where(nonfinite & (first_bad < 0), step, first_bad)
        step += 1
        for k, v in out.items():
            sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
        count += 1
        if count >= log_every:
            check(step)
            last = _flush(sums, count, prefix, bar, on_metrics, step_offset + step)
            sums, count = {}, 0
        bar.update(1)
        if probe is not None:
            started += probe.maybe(model)  # the probe's time is not training time
        if checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
            check(step)
            checkpoint(step)
            saved = step
    check(step)
    if count:
        last = _flush(sums, count, prefix, bar, on_metrics, step_offset + step)
    if probe is not None and step > start_step:
        started += probe.maybe(model, force=True)  # where the loop left the model
    bar.close()
    return LoopResult(steps=step, seconds=elapsed_offset + time.perf_counter() - started, metrics=last)


def _flush(
    sums: dict[str, torch.Tensor],
    count: int,
    prefix: str,
    bar: tqdm,
    on_metrics: MetricsCallback | None,
    step: int,
) -> dict[str, float]:
    metrics = {f"{prefix}.{k}": float(v) / count for k, v in dist.reduce_metrics(sums).items()}
    bar.set_postfix({k.split(".")[-1]: f"{v:.3g}" for k, v in metrics.items()}, refresh=False)
    if on_metrics:
        on_metrics(metrics, step)
    return metrics


def _agreed(stop: bool, total: int) -> tuple[bool, int]:
    """Rank 0's stop decision and schedule length on every rank (unchanged with one process)."""
    if dist.world().size == 1:
        return stop, total
    agreed_stop, agreed_total = dist.broadcast_numbers([float(stop), float(total)])
    return bool(agreed_stop), int(agreed_total)


def cosine_lr(base: float, step: int, total: int, warmup: int = 0, floor: float = 0.05) -> float:
    """Cosine decay from ``base`` to ``floor·base`` over ``total`` steps, with optional linear warm-up."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
