"""Metrics on real test images: top-1 accuracy (multi-class) and mAP (multi-label), overall, per label,
and per teacher sub-task. The one home of test scoring: the ``evaluate`` stage, the benchmarks and
``dfka amalgamate`` all score through these functions (``tests/test_stages.py`` checks that the stage
and the benchmark give one model the same numbers).

* **Union**: test images restricted to Y_cst labels (multi-class: images whose label is in Y_cst;
  multi-label: every image, the Y_cst columns). Metric: top-1 accuracy over Y_cst, or mAP over its labels.
* **Sub-task of teacher m**: the labels :math:`Y_m \\cap Y_{cst}`. Multi-class: the test images whose
  label is among them, argmax restricted to those labels. Multi-label: mAP over those label columns. The
  same numbers are computed for the teacher itself (its outputs for those labels), the ensemble and
  the student, so a table compares like with like.

This is the only place dfka looks at real images when amalgamating, and only at the test split.

**Metric names** (one set, everywhere): a model's scores are ``<metric>`` (the union: ``acc`` or
``map``), ``task.<teacher>.<metric>`` (teacher m's sub-task) and ``acc.<label>`` / ``ap.<label>`` (per
label); a teacher on its own labels is ``teacher.<teacher>.<metric>``. MLflow keys put the split and
the model in front: ``test.student.acc``, ``test.ensemble.task.lo.acc``, ``test.teacher.lo.acc`` from
the ``evaluate`` stage and from ``dfka bench run`` alike; a benchmark's result files, which hold one
model per row, keep the short form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from dfka.amalgamation.teacher_set import TeacherSet

Model = Callable[[torch.Tensor], torch.Tensor]
BATCH = 256  # measured faster than 1000 for these small CPU models


@torch.no_grad()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """Scores (logits) for ``images`` (N,C,H,W float in [0,1]), in batches, in eval mode."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def accuracy(scores: torch.Tensor, targets: torch.Tensor) -> float:
    return float((scores.argmax(1) == targets).float().mean()) if len(targets) else float("nan")


def per_class_accuracy(scores: torch.Tensor, targets: torch.Tensor, num_classes: int) -> list[float]:
    pred = scores.argmax(1)
    out = []
    for c in range(num_classes):
        mask = targets == c
        out.append(float((pred[mask] == c).float().mean()) if mask.any() else float("nan"))
    return out


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP of one label: the mean precision at each positive's rank."""
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(np.float64)
    precision_at_k = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at_k * hits).sum() / n_pos)


def per_label_ap(scores: torch.Tensor, targets: torch.Tensor) -> list[float]:
    s, t = scores.detach().cpu().numpy(), targets.detach().cpu().numpy() > 0.5
    return [average_precision(s[:, j], t[:, j]) for j in range(s.shape[1])]


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    aps = [a for a in per_label_ap(scores, targets) if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def confusion_matrix(scores: torch.Tensor, targets: torch.Tensor, num_classes: int) -> list[list[int]]:
    idx = targets * num_classes + scores.argmax(1)
    counts = torch.bincount(idx, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes).tolist()


def score(
    scores: torch.Tensor, targets: torch.Tensor, task: str, label_names: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """The headline metric plus per-label scores, as a flat dict of floats (MLflow-ready keys)."""
    out: dict[str, float] = {}
    if task == "multiclass":
        out[f"{prefix}acc"] = accuracy(scores, targets)
        for name, acc in zip(label_names, per_class_accuracy(scores, targets, len(label_names))):
            out[f"{prefix}acc.{name}"] = acc
    else:
        aps = per_label_ap(scores, targets)
        valid = [a for a in aps if not np.isnan(a)]
        out[f"{prefix}map"] = float(np.mean(valid)) if valid else float("nan")
        out[f"{prefix}label_acc"] = float(((scores > 0).float() == (targets > 0.5).float()).float().mean())
        for name, ap in zip(label_names, aps):
            out[f"{prefix}ap.{name}"] = ap
    return out


# ---------------------------------------------------------------- union and sub-tasks (one home: the
# evaluate stage, the benchmarks and `dfka amalgamate` all score through these)


@dataclass
class SubTask:
    """Teacher m's part of Y_cst: its Y_cst positions, its own output indices for them (same order), and
    the images and targets it is scored on (targets index into ``positions`` for multi-class)."""

    positions: list[int]
    sel: list[int]
    index: torch.Tensor
    targets: torch.Tensor


@dataclass
class EvalSet:
    images: torch.Tensor | None  # float (N, C, H, W) in [0, 1]; None for a streamed folder set
    targets: torch.Tensor  # multiclass: (N,) index into label_names; multilabel: (N, L) multi-hot
    label_names: list[str]
    task: str
    subtasks: dict[str, SubTask]

    @property
    def metric(self) -> str:
        return "map" if self.task == "multilabel" else "acc"

    def __len__(self) -> int:
        return len(self.targets)


def build_eval_set(
    images: torch.Tensor | None,
    targets: torch.Tensor,
    label_names: list[str],
    task: str,
    teachers: TeacherSet,
) -> EvalSet:
    """Attach each teacher's sub-task to a test set whose targets are over ``label_names`` (= Y_cst)."""
    if list(label_names) != list(teachers.target_labels):
        raise ValueError(f"test labels {label_names} are not Y_cst {teachers.target_labels}")
    subtasks = {}
    for name, info in teachers.infos.items():
        positions, sel = list(info.pos), list(info.sel)
        if task == "multiclass":
            lut = torch.full((len(label_names),), -1, dtype=torch.long)
            lut[positions] = torch.arange(len(positions))
            local = lut[targets]
            index = torch.nonzero(local >= 0).flatten()
            subtasks[name] = SubTask(positions, sel, index, local[index])
        else:
            index = torch.arange(len(targets))
            subtasks[name] = SubTask(positions, sel, index, targets[:, positions])
    return EvalSet(images, targets, list(label_names), task, subtasks)


def task_key(teacher: str, metric: str) -> str:
    """The name of a model's score on teacher ``teacher``'s sub-task."""
    return f"task.{teacher}.{metric}"


def teacher_key(teacher: str, metric: str) -> str:
    """The name of a teacher's score on its own labels."""
    return f"teacher.{teacher}.{metric}"


def metric_value(scores: torch.Tensor, targets: torch.Tensor, task: str) -> float:
    if task == "multiclass":
        return accuracy(scores, targets)
    return mean_average_precision(scores, targets)


def score_subtasks(scores: torch.Tensor, ev: EvalSet, prefix: str = "") -> dict[str, float]:
    """``<prefix><metric>`` (the union) and ``<prefix>task.<teacher>.<metric>`` from Y_cst scores on
    ``ev.images``."""
    m = ev.metric
    out = {f"{prefix}{m}": metric_value(scores, ev.targets, ev.task)}
    for name, sub in ev.subtasks.items():
        restricted = scores[sub.index][:, sub.positions]
        out[prefix + task_key(name, m)] = metric_value(restricted, sub.targets, ev.task)
    return out


def evaluate_model(model: Model, ev: EvalSet) -> tuple[dict[str, float], torch.Tensor]:
    """Union and sub-task metrics of a Y_cst-scoring model; also returns its scores (for agreement)."""
    scores = predict(model, ev.images, batch_size=BATCH)
    return score_subtasks(scores, ev), scores


def score_teachers(logits: Mapping[str, torch.Tensor], ev: EvalSet) -> dict[str, float]:
    """``teacher.<name>.<metric>`` from each teacher's logits on all of ``ev``'s images: the teacher on
    its own labels (within Y_cst), on its sub-task images."""
    out = {}
    for name, full in logits.items():
        sub = ev.subtasks[name]
        value = metric_value(full[sub.index][:, sub.sel], sub.targets, ev.task)
        out[teacher_key(name, ev.metric)] = value
    return out


def evaluate_teachers(teachers: TeacherSet, ev: EvalSet) -> dict[str, float]:
    """:func:`score_teachers`, predicting each teacher on its sub-task images only."""
    out = {}
    for name, model in teachers:
        sub = ev.subtasks[name]
        logits = predict(model, ev.images[sub.index], batch_size=BATCH)[:, sub.sel]
        out[teacher_key(name, ev.metric)] = metric_value(logits, sub.targets, ev.task)
    return out


@torch.no_grad()
def evaluate_folder(student: Model, teachers: TeacherSet, union: Model, folder) -> dict[str, float]:
    """The metrics of :func:`evaluate_model` and :func:`evaluate_teachers` on a user's folder test set
    (:class:`~dfka.data.folder.ImageFolderSet`), decoded a batch at a time: only the scores are kept."""
    if isinstance(student, torch.nn.Module):
        student.eval()
    names = [name for name, _ in teachers]
    student_scores, ensemble_scores, targets = [], [], []
    teacher_scores: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for images, labels in folder.batches(BATCH):
        logits = {name: model(images) for name, model in teachers}
        student_scores.append(student(images))
        ensemble_scores.append(union(logits))
        for name in names:
            teacher_scores[name].append(logits[name])
        targets.append(labels)
    ev = build_eval_set(None, torch.cat(targets), folder.label_names, "multiclass", teachers)
    out = {f"student.{k}": v for k, v in score_subtasks(torch.cat(student_scores), ev).items()}
    out |= {f"ensemble.{k}": v for k, v in score_subtasks(torch.cat(ensemble_scores), ev).items()}
    return out | score_teachers({name: torch.cat(teacher_scores[name]) for name in names}, ev)
