"""The teacher ensemble: the teachers' outputs combined on Y_cst by the same union rule every student learns.

.. math::  s(x) = \\operatorname{union}\\big(\\{z_m(x)\\}_{m=1..M}\\big)

It is the reference row of every benchmark. A data-free student that matches it has recovered what the
teachers know about Y_cst at a fraction of their cost; one that beats it routes better than the naive
combination. It trains nothing, so its stage report is empty and its cost is the teachers' combined.

The helpers :func:`teacher_logits` and :func:`union_targets` are what every KD baseline uses to build its
target, so all methods learn exactly the same function of the teachers.
"""

from __future__ import annotations

import torch
from torch import nn

from dfka.amalgamation.run import StageReport
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule


def teacher_logits(teachers: TeacherSet, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every teacher's full output on ``images`` (pixels in [0, 1]), keyed by teacher name."""
    return {name: model(images) for name, model in teachers}


@torch.no_grad()
def union_targets(teachers: TeacherSet, union: UnionRule, images: torch.Tensor) -> torch.Tensor:
    """The KD target on ``images``: the union rule applied to the teachers' logits (no gradient)."""
    return union(teacher_logits(teachers, images))


class TeacherEnsemble(nn.Module):
    """Pixels → Y_cst scores through all teachers and the union rule (no trainable state)."""

    def __init__(self, teachers: TeacherSet, union: UnionRule):
        super().__init__()
        self.teachers = teachers
        self.union = union
        self.label_names = list(teachers.target_labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.teachers.input_shape

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.union(teacher_logits(self.teachers, images))


def build_ensemble(teachers: TeacherSet, union: UnionRule) -> tuple[TeacherEnsemble, StageReport]:
    """The reference "method": nothing to train, so the report is zero seconds."""
    return TeacherEnsemble(teachers, union).eval(), StageReport(0.0)
