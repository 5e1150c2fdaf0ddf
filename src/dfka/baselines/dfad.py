"""DFAD-style data-free adversarial KD (Fang et al. 2019) on the teachers' union target.

The plain generator of the DAFL baseline plays a min-max game with the student. Each iteration runs
``student_steps`` (DFAD: 5) student steps on detached generated images, then one generator step:

.. math::
   L_S &= \\ell\\big(S(\\mathrm{sg}[G(z)]),\\ \\operatorname{union}(T(G(z)))\\big) \\\\
   L_G &= -\\big\\|S(G(z)) - \\operatorname{union}(T(G(z)))\\big\\|_1 + w_{bn} L_{bn}

The generator seeks images where the student disagrees with the teachers (DFAD's L1 on logits, here the
union scores). ``L_bn`` is DeepInversion's BatchNorm-statistics matching over every teacher BN layer: the
calibration (``../shared/method/calibration.md``) found DFAD swinging by more than 20 points between
evaluations without it, so it is on by default (weight ``gan.loss.bn`` of the shared config). The student
learns with the same ℓ as every other method (``student_loss: kd``); ``l1`` is DFAD's original student loss.
Runs inside :func:`~dfka.data.data_free`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.losses import BNStatsRecorder
from dfka.amalgamation.run import MetricsCallback, StageReport, build_student
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.baselines.dafl import PlainGenerator
from dfka.baselines.ensemble import teacher_logits
from dfka.data.guard import data_free
from dfka.engine.loop import cosine_lr, run_loop, set_lr
from dfka.runtime import seed_everything


class DfadConfig(BaseModel):
    """Options of the DFAD baseline; ``None`` falls back to the shared amalgamation config."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    student_steps: int = Field(5, ge=1, description="student steps per generator step (DFAD: 5)")
    bn: float | None = Field(None, ge=0, description="BN-statistics matching weight; default gan.loss.bn")
    student_loss: Literal["kd", "l1"] = Field("kd", description="kd: the shared union loss; l1: DFAD's")
    batch_size: int | None = Field(None, ge=2, description="default: amalgamation gan.batch_size")


def train_dfad(
    teachers: TeacherSet,
    union: UnionRule,
    cfg: AmalgamationConfig,
    budget: Budget,
    *,
    options: DfadConfig | None = None,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> tuple[nn.Module, PlainGenerator, StageReport]:
    """Adversarial generator and student for ``budget``; return the student, the generator and the report.

    One loop step is one iteration (``student_steps`` student updates and one generator update).
    """
    options = options or DfadConfig()
    batch_size = options.batch_size or cfg.gan.batch_size
    w_bn = cfg.gan.loss.bn if options.bn is None else options.bn
    k = options.student_steps
    mask = union.multiclass_mask
    with data_free("DFAD baseline"):
        seed_everything(cfg.seed)
        generator = PlainGenerator(teachers.input_shape, cfg.gan.latent_dim).to(device)
        student = build_student(cfg.student, teachers).to(device)
        opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.gan.lr, betas=(0.5, 0.999))
        opt_s = torch.optim.Adam(student.parameters(), lr=cfg.blocks.lr)
        bn = BNStatsRecorder(teachers.models.values()) if w_bn > 0 else None
        rng = torch.Generator().manual_seed(cfg.seed)

        def latent() -> torch.Tensor:
            return torch.randn(batch_size, cfg.gan.latent_dim, generator=rng).to(device)

        def student_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if options.student_loss == "l1":
                return F.l1_loss(scores, target)
            return union_loss(scores, target, mask, cfg.blocks.temperature)

        def step(i: int, total: int) -> dict[str, torch.Tensor]:
            generator.train()
            student.train()
            set_lr(opt_g, cosine_lr(cfg.gan.lr, i, total))
            set_lr(opt_s, cosine_lr(cfg.blocks.lr, i, total))
            for _ in range(k):
                with torch.no_grad():
                    image = generator(latent())
                    target = union(teacher_logits(teachers, image))
                kd = student_loss(student(image), target)
                opt_s.zero_grad(set_to_none=True)
                kd.backward()
                opt_s.step()

            image = generator(latent())
            if bn is not None:
                bn.active = True
            target = union(teacher_logits(teachers, image))
            if bn is not None:
                bn.active = False
            student.requires_grad_(False)  # gradients flow through the student to the image only
            adv = F.l1_loss(student(image), target)
            student.requires_grad_(True)
            bn_term = bn.pop() if bn is not None else adv.new_zeros(())
            loss_g = -adv + w_bn * bn_term
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            return {"loss": loss_g.detach(), "kd": kd.detach(), "adv": adv.detach(), "bn": bn_term.detach()}

        try:
            result = run_loop(
                step,
                budget,
                desc="DFAD",
                prefix="dfad",
                on_metrics=on_metrics,
                progress=progress,
                model=student,
            )
        finally:
            if bn is not None:
                bn.remove()
    student.eval()
    samples = result.steps * batch_size * (k + 1)
    return student, generator, StageReport(result.seconds, result.steps, samples, dict(result.metrics))
