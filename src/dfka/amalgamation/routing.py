"""Data-free routing calibration for multi-class teachers.

Almost all of the teacher ensemble's union error is *routing*: deciding which teacher owns an image.
Each teacher is confidently wrong on the others' classes, and teachers differ in how large their logits
run, so raw logit concatenation favours the loudest teacher. The ``bias`` calibration fits one offset
``b_m`` per teacher on generated samples, with no data:

1. each sample is claimed by the teacher that owns its union argmax (its *owner*);
2. for teacher ``m``, ``s_m(x)`` is its top score over its Y_cst labels; ``own_m`` are its scores on the
   samples it claims, ``foreign_m`` on the samples others claim;
3. the decision point of teacher ``m`` is the midpoint of the two medians; the offsets move every
   teacher's midpoint to the same place:

.. math::  b_m = \\bar c - c_m,\\qquad c_m = \\tfrac12\\big(\\operatorname{med}(own_m) + \\operatorname{med}(foreign_m)\\big)

Whether this beats the naive concatenation on real images is measured by the benchmarks, not assumed.
"""

from __future__ import annotations

import torch

from dfka.amalgamation.samples import SampleBank
from dfka.amalgamation.union import UnionRule


@torch.no_grad()
def calibrate_routing(
    union: UnionRule, bank: SampleBank, max_samples: int = 20000
) -> dict[str, dict[str, float]]:
    """Fit ``union.bias`` on the bank's teacher logits; return the fitted calibration per teacher."""
    names = [n for n in union.names if union.infos[n].task == "multiclass"]
    if len(names) < 2:
        return union.calibration()
    union.bias.zero_()
    n = min(len(bank), max_samples)
    logits = {name: bank.tensors[f"logits.{name}"][:n].float().to(union.bias.device) for name in union.names}
    scores = union(logits)
    owner_of_label = torch.full((scores.shape[1],), -1, dtype=torch.long, device=scores.device)
    for i, name in enumerate(names):
        owner_of_label[list(union.infos[name].pos)] = i
    owner = owner_of_label[scores.argmax(1)]
    centres = []
    for i, name in enumerate(names):
        s = scores[:, list(union.infos[name].pos)].max(1).values
        own, foreign = s[owner == i], s[(owner != i) & (owner >= 0)]
        if len(own) == 0 or len(foreign) == 0:
            return union.calibration()  # a teacher claims nothing (or everything): leave routing alone
        centres.append(0.5 * (own.median() + foreign.median()))
    centre = torch.stack(centres)
    for i, name in enumerate(names):
        union.bias[union.names.index(name)] = centre.mean() - centre[i]
    return union.calibration()
