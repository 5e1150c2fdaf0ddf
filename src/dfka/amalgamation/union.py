"""Union targets: how M teachers' outputs become one score per label of Y_cst.

Rules for multi-class teachers (per-teacher routing calibration ``T_m``, ``b_m``; identity by default):

* ``logits`` (default): raw logit concatenation, :math:`s_y = \\operatorname{mean}_{m \\ni y}(z_{m,y}/T_m + b_m)`.
  It keeps the logit magnitude, which is what routes an image to the teacher that owns it; in the
  calibration it beat the softmax rules (``../shared/method/calibration.md``).
* ``softmax``: softmax concatenation, :math:`s_y = \\log \\operatorname{mean}_{m \\ni y}
  \\operatorname{softmax}(z_m/T_m)_y + b_m`.

Multi-label teachers always average probabilities: :math:`s_y = \\operatorname{logit}\\,
\\operatorname{mean}_{m \\ni y} \\sigma(z_{m,y}/T_m + b_m)`.

Scores live in logit space, so one KL (multi-class labels) or BCE (multi-label labels) compares a
student's union output with the teachers'.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dfka.amalgamation.teacher_set import TeacherSet
from dfka.engine import distributed as dist
from dfka.errors import ConfigError

RULES = ("logits", "softmax")
_EPS = 1e-6


class UnionRule(nn.Module):
    """Combines teacher logits into Y_cst scores; ``bias``/``log_temp`` hold the routing calibration."""

    def __init__(self, teachers: TeacherSet, rule: str = "logits"):
        super().__init__()
        if rule not in RULES:
            raise ConfigError(f"unknown union rule {rule!r}", f"use one of {RULES}")
        self.rule = rule
        self.names = teachers.names
        self.infos = teachers.infos
        self.num_labels = len(teachers.target_labels)
        self.register_buffer("owners", teachers.owners.clone())
        multiclass = torch.tensor([t == "multiclass" for t in teachers.label_tasks])
        self.register_buffer("multiclass_mask", multiclass)
        self.bias = nn.Parameter(torch.zeros(len(self.names)), requires_grad=False)
        self.log_temp = nn.Parameter(torch.zeros(len(self.names)), requires_grad=False)

    def forward(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``logits[name]`` is teacher ``name``'s full output (N, T_m); returns (N, |Y_cst|) scores."""
        first = next(iter(logits.values()))
        acc = first.new_zeros(first.shape[0], self.num_labels)
        for i, name in enumerate(self.names):
            info = self.infos[name]
            z = logits[name] / self.log_temp[i].exp()
            if info.task == "multiclass":
                if self.rule == "logits":
                    part = z[:, list(info.sel)] + self.bias[i]
                else:
                    part = F.softmax(z, dim=1)[:, list(info.sel)] * self.bias[i].exp()
            else:
                part = torch.sigmoid(z[:, list(info.sel)] + self.bias[i])
            acc = acc.index_add(1, torch.tensor(info.pos, device=acc.device), part)
        mean = acc / self.owners
        if self.rule == "logits":
            multilabel = torch.logit(mean.clamp(_EPS, 1 - _EPS))
            return torch.where(self.multiclass_mask, mean, multilabel)
        logp = torch.log(mean.clamp_min(_EPS))
        return torch.where(self.multiclass_mask, logp, torch.logit(mean.clamp(_EPS, 1 - _EPS)))

    def calibration(self) -> dict[str, dict[str, float]]:
        """The routing calibration per teacher (identity: bias 0, temperature 1)."""
        return {
            name: {"bias": float(self.bias[i]), "temperature": float(self.log_temp[i].exp())}
            for i, name in enumerate(self.names)
        }

    @torch.no_grad()
    def load_calibration(self, calibration: dict[str, dict[str, float]]) -> None:
        """Restore what :meth:`calibration` returned (e.g. from an export manifest)."""
        unknown = set(calibration) - set(self.names)
        if unknown:
            raise ConfigError(f"routing calibration names unknown teachers {sorted(unknown)}")
        for i, name in enumerate(self.names):
            if name in calibration:
                self.bias[i] = calibration[name]["bias"]
                self.log_temp[i] = torch.log(torch.tensor(calibration[name]["temperature"]))


def union_loss(
    student: torch.Tensor,
    target: torch.Tensor,
    multiclass_mask: torch.Tensor,
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(target ‖ student) over the multi-class labels plus BCE on the multi-label ones.

    .. math::  \\ell = T^2\\,\\mathrm{KL}\\big(\\operatorname{softmax}(t/T)\\,\\|\\,\\operatorname{softmax}(s/T)\\big)
               + \\mathrm{BCE}\\big(s, \\sigma(t)\\big)

    ``weights`` (N,) weights samples (a weighted mean over the batch).
    """
    per_sample = student.new_zeros(student.shape[0])
    if multiclass_mask.any():
        s, t = student[:, multiclass_mask] / temperature, target[:, multiclass_mask] / temperature
        log_t = F.log_softmax(t, 1)
        kl = (log_t.exp() * (log_t - F.log_softmax(s, 1))).sum(1)
        per_sample = per_sample + kl * temperature**2
    if not multiclass_mask.all():
        ml = ~multiclass_mask
        bce = F.binary_cross_entropy_with_logits(
            student[:, ml], torch.sigmoid(target[:, ml]), reduction="none"
        )
        per_sample = per_sample + bce.mean(1)
    if weights is None:
        return dist.mean(per_sample)
    if dist.world().size == 1:
        return (per_sample * weights).sum() / weights.sum()
    return dist.global_sum((per_sample * weights).sum()) / dist.global_sum(weights.sum())


def predict_labels(scores: torch.Tensor, multiclass_mask: torch.Tensor) -> torch.Tensor:
    """Union prediction: argmax over multi-class labels (as a one-hot), threshold 0 for multi-label ones."""
    out = (scores > 0).to(scores.dtype)
    if multiclass_mask.any():
        mc = scores[:, multiclass_mask]
        onehot = F.one_hot(mc.argmax(1), mc.shape[1]).to(scores.dtype)
        out[:, multiclass_mask] = onehot
    return out
