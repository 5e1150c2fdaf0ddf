"""Benchmark metrics on the real test split: the union metric over Y_cst and one sub-task metric per teacher.

* **Union**: test images of the benchmark's dataset restricted to Y_cst labels (multi-class: images whose
  label is in Y_cst; multi-label: every image, the Y_cst columns). Metric: top-1 accuracy over Y_cst, or
  mAP over Y_cst's labels.
* **Sub-task of teacher m**: the labels :math:`Y_m \\cap Y_{cst}`. Multi-class: the test images whose label
  is among them, argmax restricted to those labels. Multi-label: mAP over those label columns. The same
  numbers are computed for the teacher itself (its outputs for those labels), the ensemble and every
  student, so the table compares like with like.

Always the final model; nothing here feeds back into training or model selection.

**Dev split** (``eval_split: dev``, for tuning): a fixed subset of the *training* split (``DEV_IMAGES``
images drawn with ``DEV_SEED``; for mosaics, ``DEV_IMAGES`` new mosaics of training tiles). Data-free
methods never see it (it is read only to score their final model), so choices can be made on it and the
test split stays untouched until the reported run. The teachers were trained on these images, so the
teachers and the ensemble score higher on it than on the test split; compare methods, not absolutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dfka.amalgamation.teacher_set import TeacherSet
from dfka.evaluation import accuracy, mean_average_precision, predict

Model = Callable[[torch.Tensor], torch.Tensor]
BATCH = 256  # measured faster than 1000 for these small CPU models
DEV_IMAGES = 10000
DEV_SEED = 20261201
#: Accuracy-vs-time curves score the model on the dev set's first PROBE_IMAGES, PROBE_POINTS times per budget.
PROBE_IMAGES = 2000
PROBE_POINTS = 20


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
    """The union metric of a model on ``ev``, for a :class:`~dfka.amalgamation.probe.TimeProbe`."""

    def score(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        scores = predict(model, ev.images.to(device), batch_size=BATCH).cpu()
        return metric_value(scores, ev.targets, ev.task)

    return score


def metric_value(scores: torch.Tensor, targets: torch.Tensor, task: str) -> float:
    if task == "multiclass":
        return accuracy(scores, targets)
    return mean_average_precision(scores, targets)


def score_subtasks(scores: torch.Tensor, ev: EvalSet, prefix: str = "") -> dict[str, float]:
    """``<prefix>union_<metric>`` and ``<prefix><metric>.<teacher>`` from Y_cst scores on ``ev.images``."""
    m = ev.metric
    out = {f"{prefix}union_{m}": metric_value(scores, ev.targets, ev.task)}
    for name, sub in ev.subtasks.items():
        restricted = scores[sub.index][:, sub.positions]
        out[f"{prefix}{m}.{name}"] = metric_value(restricted, sub.targets, ev.task)
    return out


def agreement(scores: torch.Tensor, reference: torch.Tensor, task: str) -> float:
    """How often two models predict the same: same argmax (multi-class), same sign per label (multi-label)."""
    if task == "multiclass":
        return float((scores.argmax(1) == reference.argmax(1)).float().mean())
    return float(((scores > 0) == (reference > 0)).float().mean())


def evaluate_model(model: Model, ev: EvalSet) -> tuple[dict[str, float], torch.Tensor]:
    """Union and sub-task metrics of a Y_cst-scoring model; also returns its scores (for agreement)."""
    scores = predict(model, ev.images, batch_size=BATCH)
    return score_subtasks(scores, ev), scores


def evaluate_teachers(teachers: TeacherSet, ev: EvalSet) -> dict[str, float]:
    """``teacher_<metric>.<name>``: each teacher on its own labels (within Y_cst), on its sub-task images."""
    out = {}
    for name, model in teachers:
        sub = ev.subtasks[name]
        logits = predict(model, ev.images[sub.index], batch_size=BATCH)[:, sub.sel]
        out[f"teacher_{ev.metric}.{name}"] = metric_value(logits, sub.targets, ev.task)
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
    for name in names:
        sub = ev.subtasks[name]
        restricted = torch.cat(teacher_scores[name])[sub.index][:, sub.sel]
        out[f"teacher_{ev.metric}.{name}"] = metric_value(restricted, sub.targets, ev.task)
    return out
