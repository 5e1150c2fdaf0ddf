"""Metrics on real test images: top-1 accuracy (multi-class) and mAP (multi-label), overall and per label.

This is the only place dfka looks at real images when amalgamating, and only at the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


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
