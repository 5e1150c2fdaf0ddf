"""Benchmark-side evaluation: the dev split for tuning and the probe set of the accuracy-vs-time
curves. The scoring itself lives in :mod:`dfka.evaluation` (union and per-teacher sub-tasks).

Always the final model; nothing here feeds back into training or model selection.

**Dev split** (``eval_split: dev``, for tuning): a fixed subset of the *training* split (``DEV_IMAGES``
images drawn with ``DEV_SEED``; for mosaics, ``DEV_IMAGES`` new mosaics of training tiles). Data-free
methods never see it (it is read only to score their final model), so choices can be made on it and the
test split stays untouched until the reported run. The teachers were trained on these images, so the
teachers and the ensemble score higher on it than on the test split; compare methods, not absolutes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dfka.amalgamation.teacher_set import TeacherSet
from dfka.evaluation import BATCH, EvalSet, build_eval_set, metric_value, predict

DEV_IMAGES = 10000
DEV_SEED = 20261201
#: Accuracy-vs-time curves score the model on the dev set's first PROBE_IMAGES, PROBE_POINTS times per budget.
PROBE_IMAGES = 2000
PROBE_POINTS = 20


def load_eval_set(
    dataset: str, teachers: TeacherSet, task: str, split: str = "test", limit: int = DEV_IMAGES
) -> EvalSet:
    """The benchmark's real test split over Y_cst (allowed in data-free stages: it is the test split),
    or with ``split="dev"`` the fixed dev subset of the training split (see the module docstring); its
    first ``limit`` images with a smaller ``limit`` (the probe set is the dev set's first ``PROBE_IMAGES``)."""
    from dfka.data import load_split

    if split == "test":
        part = load_split(dataset, "test", labels=teachers.target_labels, task=task)
        images, targets = part.tensors()
    elif split == "dev":
        if dataset == "mosaic":
            part = load_split(
                dataset, "train", labels=teachers.target_labels, task=task, n=limit, seed=DEV_SEED
            )
            images, targets = part.tensors()
        else:
            part = load_split(dataset, "train", labels=teachers.target_labels, task=task)
            images, targets = part.tensors()
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(DEV_SEED))
            pick = pick[:limit].sort().values
            images, targets = images[pick], targets[pick]
    else:
        raise ValueError(f"unknown evaluation split {split!r} (test or dev)")
    return build_eval_set(images, targets, part.label_names, task, teachers)


def probe_score(ev: EvalSet) -> Callable[[torch.nn.Module], float]:
    """The union metric of a model on ``ev``, for a :class:`~dfka.engine.probe.TimeProbe`."""

    def score(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        scores = predict(model, ev.images.to(device), batch_size=BATCH).cpu()
        return metric_value(scores, ev.targets, ev.task)

    return score


def agreement(scores: torch.Tensor, reference: torch.Tensor, task: str) -> float:
    """How often two models predict the same: same argmax (multi-class), same sign per label (multi-label)."""
    if task == "multiclass":
        return float((scores.argmax(1) == reference.argmax(1)).float().mean())
    return float(((scores > 0) == (reference > 0)).float().mean())
