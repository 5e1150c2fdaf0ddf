"""DAFL-style data-free multi-teacher KD (Chen et al. 2019), the single-generator baseline.

One plain generator (no group stack, no filters) and the student train together. Per step:

.. math::  L_G = L_{oh} + α L_a + β L_{ie} + γ L_{dis} + w_{bn} L_{bn},\\qquad
           L_S = \\ell\\big(S(\\mathrm{sg}[G(z)]),\\ \\mathrm{union}(T(G(z)))\\big)

with the same named terms, union rule and student as dfka, so that only the method differs. The
teachers run once per step: their scores feed both the generator loss and the student's target.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.losses import BNStatsRecorder, InputRecorder, bn_recorder
from dfka.amalgamation.run import MetricsCallback, StageReport, build_student
from dfka.amalgamation.stage1 import generator_terms
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.data.guard import data_free
from dfka.engine.loop import cosine_lr, run_loop, set_lr


class DaflConfig(BaseModel):
    """Options of the DAFL baseline (the rest it shares with dfka's ``amalgamation:`` config)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    bn_routing: Literal["batch", "owner"] = Field(
        "batch",
        description="batch: BN matching over the whole batch (the baseline's recipe); owner: dfka's "
        "owner-routed matching, for the ablation that separates routing from the rest of dfka",
    )


class PlainGenerator(nn.Module):
    """DAFL's generator at calibration widths: linear seed at 1/4 resolution, two up-convs, sigmoid."""

    def __init__(
        self, image_shape: tuple[int, ...], latent_dim: int = 100, widths: tuple[int, int, int] = (32, 32, 16)
    ):
        super().__init__()
        c, h, w = image_shape
        self.seed_hw = (h // 4, w // 4)
        self.latent_dim = latent_dim
        self.seed = nn.Sequential(nn.Linear(latent_dim, widths[0] * self.seed_hw[0] * self.seed_hw[1]))
        self.body = nn.Sequential(
            nn.BatchNorm2d(widths[0]),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(widths[0], widths[1], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[1]),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(size=(h, w)),
            nn.Conv2d(widths[1], widths[2], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[2]),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(widths[2], c, 3, 1, 1),
            nn.Sigmoid(),
        )
        self.widths = widths

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.seed(z).view(z.shape[0], self.widths[0], *self.seed_hw))


def train_dafl(
    teachers: TeacherSet,
    union: UnionRule,
    cfg: AmalgamationConfig,
    budget: Budget,
    *,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
    options: DaflConfig | None = None,
) -> tuple[nn.Module, PlainGenerator, StageReport]:
    """Train generator and student jointly for ``budget``; return the student and the generator."""
    options = options or DaflConfig()
    with data_free("DAFL baseline"):
        torch.manual_seed(cfg.seed)
        generator = PlainGenerator(teachers.input_shape, cfg.gan.latent_dim).to(device)
        student = build_student(cfg.student, teachers).to(device)
        # the same compute path as dfka (fast.py: folded teachers, GEMM thin convs, fused Adam), so that
        # equal wall-clock budgets buy both methods the same speed per step
        teachers.path.accelerate(generator, device)
        teachers.path.accelerate(student, device)
        compute = teachers.compute_models()
        adam = teachers.path.adam_options(device)
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.gan.lr, betas=(0.5, 0.999), **adam)
        opt_s = torch.optim.Adam(student.parameters(), lr=cfg.blocks.lr, **adam)
        bn: BNStatsRecorder | None = None
        if cfg.gan.loss.bn > 0:
            bn = bn_recorder(compute, options.bn_routing, teachers.path)
        heads = InputRecorder({n: m.head for n, m in compute.items()})
        rng = torch.Generator().manual_seed(cfg.seed)
        w = cfg.gan.loss
        mask = union.multiclass_mask

        def step(i: int, total: int) -> dict[str, torch.Tensor]:
            generator.train()
            student.train()
            set_lr(opt_g, cosine_lr(cfg.gan.lr, i, total))
            set_lr(opt_s, cosine_lr(cfg.blocks.lr, i, total))
            z = torch.randn(cfg.gan.batch_size, cfg.gan.latent_dim, generator=rng).to(device)
            image = generator(z)
            if bn is not None:
                bn.active = True
            logits = {n: m(image) for n, m in compute.items()}
            if bn is not None:
                bn.active = False
            parts, scores = generator_terms(teachers, union, logits, dict(heads.values))
            parts["bn"] = bn.term(teachers, logits) if bn is not None else scores.new_zeros(())
            loss_g = w.weighted(parts)  # oh, a, ie, dis, bn: no consistency or adversarial term
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            kd = union_loss(student(image.detach()), scores.detach(), mask, cfg.blocks.temperature)
            opt_s.zero_grad(set_to_none=True)
            kd.backward()
            opt_s.step()
            return {"loss": loss_g.detach(), "kd": kd.detach(), **{k: v.detach() for k, v in parts.items()}}

        result = run_loop(
            step,
            budget,
            desc="DAFL",
            prefix="dafl",
            on_metrics=on_metrics,
            progress=progress,
            model=student,
        )
        if bn is not None:
            bn.remove()
        heads.remove()
    student.eval()
    return (
        student,
        generator,
        StageReport(result.seconds, result.steps, result.steps * cfg.gan.batch_size, result.metrics),
    )
