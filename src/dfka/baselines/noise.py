"""Noise KD, the lower bound: the student learns the teachers' union target on random images.

Per step, with :math:`x \\sim \\mathcal N(\\mu, \\sigma^2)` per pixel clamped to [0, 1] (``gaussian``, where
μ and σ are the per-channel pixel statistics the teachers' bundles carry as their input normalisation) or
:math:`x \\sim U[0, 1]` (``uniform``):

.. math::  L_S = \\ell\\big(S(x),\\ \\operatorname{union}(T(x))\\big)

with ℓ the same :func:`~dfka.amalgamation.union.union_loss` every method uses. Nothing is learned about
the input distribution, which is what every generator-based method has to beat. Runs inside
:func:`~dfka.data.data_free`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.run import MetricsCallback, StageReport, build_student
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.baselines.ensemble import union_targets
from dfka.data.guard import data_free
from dfka.engine.loop import cosine_lr, run_loop, set_lr
from dfka.runtime import seed_everything


class NoiseConfig(BaseModel):
    """Options of the noise baseline; ``None`` falls back to the shared amalgamation config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["gaussian", "uniform"] = "gaussian"
    batch_size: int | None = Field(None, ge=2, description="default: amalgamation gan.batch_size")
    lr: float | None = Field(None, gt=0, description="student Adam LR; default: amalgamation blocks.lr")


class NoiseSource:
    """Draws random images in pixel space: ``source(n)`` → ``(n, C, H, W)`` in [0, 1]."""

    def __init__(
        self,
        shape: tuple[int, ...],
        kind: str = "gaussian",
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        seed: int = 0,
    ):
        self.shape = tuple(shape)
        self.kind = kind
        channels = self.shape[0]
        self.mean = (mean if mean is not None else torch.full((channels,), 0.5)).reshape(-1, 1, 1).float()
        self.std = (std if std is not None else torch.full((channels,), 0.25)).reshape(-1, 1, 1).float()
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        if self.kind == "uniform":
            x = torch.rand(n, *self.shape, generator=self.rng)
        else:
            x = (torch.randn(n, *self.shape, generator=self.rng) * self.std + self.mean).clamp_(0, 1)
        return x.to(device or torch.device("cpu"))

    @classmethod
    def for_teachers(cls, teachers: TeacherSet, kind: str = "gaussian", seed: int = 0) -> NoiseSource:
        """μ, σ from the first teacher's input normalisation (its training pixels' statistics)."""
        first = next(iter(teachers.models.values()))
        return cls(teachers.input_shape, kind, first.mean.flatten().cpu(), first.std.flatten().cpu(), seed)


def train_noise(
    teachers: TeacherSet,
    union: UnionRule,
    cfg: AmalgamationConfig,
    budget: Budget,
    *,
    options: NoiseConfig | None = None,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> tuple[nn.Module, NoiseSource, StageReport]:
    """Train the student on noise for ``budget``; return the student, the noise source and the report."""
    options = options or NoiseConfig()
    batch_size = options.batch_size or cfg.gan.batch_size
    lr = options.lr or cfg.blocks.lr
    with data_free("noise KD baseline"):
        seed_everything(cfg.seed)
        student = build_student(cfg.student, teachers).to(device)
        source = NoiseSource.for_teachers(teachers, options.kind, seed=cfg.seed)
        opt = torch.optim.Adam(student.parameters(), lr=lr)
        mask = union.multiclass_mask

        def step(i: int, total: int) -> dict[str, torch.Tensor]:
            student.train()
            set_lr(opt, cosine_lr(lr, i, total))
            x = source(batch_size, device)
            kd = union_loss(student(x), union_targets(teachers, union, x), mask, cfg.blocks.temperature)
            opt.zero_grad(set_to_none=True)
            kd.backward()
            opt.step()
            return {"loss": kd.detach(), "kd": kd.detach()}

        result = run_loop(
            step,
            budget,
            desc="noise KD",
            prefix="noise",
            on_metrics=on_metrics,
            progress=progress,
            model=student,
        )
    student.eval()
    report = StageReport(result.seconds, result.steps, result.steps * batch_size, dict(result.metrics))
    return student, source, report
