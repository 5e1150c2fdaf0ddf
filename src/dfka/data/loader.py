"""``load_split``: one entry point from (dataset, split, label subset, task) to images and targets.

Every dataset goes through the guarded raw loaders (:func:`mnist_arrays`, :func:`fashion_arrays`,
:func:`build_mosaics`), so a data-free stage cannot reach training images by any route.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from dfka.data import mosaic as _mosaic
from dfka.data.fashion import fashion_arrays
from dfka.data.labels import (
    ALL_LABELS,
    LABEL_INDEX,
    check_dataset,
    is_folder_dataset,
    label_names,
    parse_labels,
    source_of,
)
from dfka.data.mnist import mnist_arrays
from dfka.errors import ConfigError, LabelError

if TYPE_CHECKING:
    import torch

Split = Literal["train", "test"]
Task = Literal["multiclass", "multilabel"]
TASKS: tuple[str, ...] = ("multiclass", "multilabel")
_SOURCES = {"mnist": (mnist_arrays, 0), "fashion": (fashion_arrays, 10)}  # loader, offset into ALL_LABELS


@dataclass
class ImageSet:
    """Images and targets of one split.

    ``images`` is uint8 ``(N, C, H, W)`` (``C = 1`` for the built-in datasets). ``targets`` is int64 ``(N,)`` (index into ``label_names``) for
    ``multiclass`` and float32 ``(N, L)`` multi-hot for ``multilabel``.
    """

    images: np.ndarray
    targets: np.ndarray
    label_names: list[str]
    task: Task
    dataset: str
    split: Split

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def label_counts(self) -> np.ndarray:
        """Images per label (multiclass) or positives per label (multilabel), int64 ``(L,)``."""
        if self.task == "multiclass":
            return np.bincount(self.targets, minlength=self.num_labels).astype(np.int64)
        return self.targets.sum(axis=0).astype(np.int64)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float32 images in [0, 1] of shape (N, C, H, W), targets)`` as torch tensors."""
        import torch  # lazy: importing dfka.data must stay cheap (CLI, KFP component start-up)

        images = torch.from_numpy(np.ascontiguousarray(self.images)).to(torch.float32).div_(255.0)
        return images, torch.from_numpy(np.array(self.targets, copy=True))


def _check_split(split: str) -> Split:
    if split not in ("train", "test"):
        raise ConfigError(f"unknown split {split!r}", "use 'train' or 'test'")
    return split  # type: ignore[return-value]


def _check_task(dataset: str, task: str | None) -> Task:
    if task is None:
        return "multilabel" if dataset == "mosaic" else "multiclass"
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
    if dataset == "mosaic" and task == "multiclass":
        raise LabelError(
            "the mosaic dataset is multi-label (1-4 objects per image), so it has no multiclass targets",
            "use task='multilabel' (--task multilabel), or a single-label dataset: mnist, fashion, mnist+fashion",
        )
    return task  # type: ignore[return-value]


def load_split(
    dataset: str,
    split: Split,
    labels: Sequence[str] | str | None = None,
    task: Task | None = None,
    *,
    n: int | None = None,
    seed: int | None = None,
    tiles: tuple[int, int] | None = None,
) -> ImageSet:
    """Load ``split`` of ``dataset`` (``mnist``, ``fashion``, ``mnist+fashion``, ``mosaic``, or a folder
    dataset: ``ROOT/{train,test}/LABEL/IMAGE.png``, :mod:`dfka.data.folder`).

    ``labels`` (names or a spec like ``"digit_0..digit_4"``) selects and orders the labels: multiclass keeps
    only images of those classes and numbers them in the given order; multilabel on a single-label
    dataset gives one-hot rows over the subset (other images dropped); on ``mosaic`` it selects label
    columns and keeps every image. ``n``/``seed``/``tiles`` configure ``mosaic`` only (defaults in
    :mod:`dfka.data.mosaic`). Never downloads; raises DataFreeViolation for ``train`` in a data-free stage.
    """
    check_dataset(dataset)
    split = _check_split(split)
    task = _check_task(dataset, task)
    chosen = label_names(dataset) if labels is None else parse_labels(labels, dataset)

    if is_folder_dataset(dataset):
        if n is not None or seed is not None or tiles is not None:
            raise ConfigError("n, seed and tiles only apply to the mosaic dataset", "drop them")
        if task != "multiclass":
            raise LabelError(
                f"a folder dataset has one label per image, so it has no {task} targets",
                "use task multiclass",
            )
        from dfka.data.folder import load_folder_split  # lazy: it reaches the object store

        images, index = load_folder_split(dataset, split, chosen)
        return ImageSet(images, index, chosen, task, dataset, split)

    if dataset == "mosaic":
        mosaics = _mosaic.build_mosaics(
            split,
            n=n,
            seed=_mosaic.DEFAULT_SEED if seed is None else seed,
            tiles=_mosaic.DEFAULT_TILES if tiles is None else tiles,
        )
        cols = [LABEL_INDEX[name] for name in chosen]
        targets = np.ascontiguousarray(mosaics.targets[:, cols])
        return ImageSet(mosaics.images[:, None].copy(), targets, chosen, task, dataset, split)

    if n is not None or seed is not None or tiles is not None:
        raise ConfigError(f"n, seed and tiles only apply to the mosaic dataset, not {dataset!r}", "drop them")

    lut = np.full(len(ALL_LABELS), -1, dtype=np.int64)  # global label index -> position in `chosen`
    lut[[LABEL_INDEX[name] for name in chosen]] = np.arange(len(chosen))
    xs, ys = [], []
    # digits first, matching ALL_LABELS; a source none of the chosen labels come from is not read at all
    for source in ("mnist", "fashion"):
        if not any(source_of(name) == source for name in chosen):
            continue
        loader, offset = _SOURCES[source]
        x, y = loader(split)
        local = lut[y + offset]
        keep = np.flatnonzero(local >= 0)
        xs.append(x[keep])
        ys.append(local[keep])
    images = np.concatenate(xs) if len(xs) > 1 else xs[0]
    index = np.concatenate(ys) if len(ys) > 1 else ys[0]
    targets = index if task == "multiclass" else np.eye(len(chosen), dtype=np.float32)[index]
    return ImageSet(images[:, None], targets, chosen, task, dataset, split)
