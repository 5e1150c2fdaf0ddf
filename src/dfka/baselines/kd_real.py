"""KD with real data, the upper bound: the student learns the teachers' union target on real unlabeled images.

Per step, on a mini-batch :math:`x` of real training images (labels never read):

.. math::  L_S = \\ell\\big(S(x),\\ \\operatorname{union}(T(x))\\big)

with ℓ the same :func:`~dfka.amalgamation.union.union_loss` every method uses, so the only difference to
the data-free methods is where the images come from. This is *not* a data-free method: the caller loads
the training images (outside any :func:`~dfka.data.data_free` block) and passes them in.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.run import MetricsCallback, StageReport, build_student
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.baselines.ensemble import union_targets
from dfka.engine.loop import cosine_lr, run_loop, set_lr
from dfka.errors import DataError
from dfka.runtime import seed_everything


class KDRealConfig(BaseModel):
    """Options of the KD-with-real-data baseline."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(64, ge=2)
    lr: float | None = Field(None, gt=0, description="student Adam LR; default: amalgamation blocks.lr")


def image_batches(
    images: torch.Tensor, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches of ``images`` (uint8 or float in [0, 1]) as float in [0, 1]."""
    if len(images) < batch_size:
        raise DataError(f"{len(images)} real images for a batch size of {batch_size}", "lower the batch size")
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            x = images[order[start : start + batch_size]]
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            yield x.to(device)


def train_kd_real(
    teachers: TeacherSet,
    union: UnionRule,
    cfg: AmalgamationConfig,
    budget: Budget,
    images: torch.Tensor,
    *,
    options: KDRealConfig | None = None,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> tuple[nn.Module, StageReport]:
    """Train the student on ``images`` ``(N, C, H, W)`` for ``budget``; return it and the report."""
    options = options or KDRealConfig()
    lr = options.lr or cfg.blocks.lr
    seed_everything(cfg.seed)
    student = build_student(cfg.student, teachers).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    batches = image_batches(images, options.batch_size, torch.Generator().manual_seed(cfg.seed), device)
    mask = union.multiclass_mask

    def step(i: int, total: int) -> dict[str, torch.Tensor]:
        student.train()
        set_lr(opt, cosine_lr(lr, i, total))
        x = next(batches)
        kd = union_loss(student(x), union_targets(teachers, union, x), mask, cfg.blocks.temperature)
        opt.zero_grad(set_to_none=True)
        kd.backward()
        opt.step()
        return {"loss": kd.detach(), "kd": kd.detach()}

    result = run_loop(
        step,
        budget,
        desc="KD (real data)",
        prefix="kd_real",
        on_metrics=on_metrics,
        progress=progress,
        model=student,
    )
    student.eval()
    extra = dict(result.metrics) | {"epochs": result.steps * options.batch_size / len(images)}
    return student, StageReport(result.seconds, result.steps, result.steps * options.batch_size, extra)
