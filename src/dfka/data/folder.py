"""A user's own labelled test set: one folder per label name, image files inside.

::

    my-test-set/                 (a local folder or s3://bucket/prefix)
      golden_retriever/ 0001.png 0002.jpg ...
      tabby_cat/        a.png ...

Folder names are label names (the teachers' names, the same safe-name rule as manifests); files are
PNG or JPEG, decoded with Pillow to the teachers' channel count (``L`` or ``RGB``) and required to be
exactly the teachers' input size (no silent resizing: a resized image is not the image the teachers
would see). :func:`open_folder` lists and checks the whole set first (label names, counts, sizes, every
file's header), so a bad set fails before any training; :meth:`ImageFolderSet.batches` then decodes a
batch at a time, so the set is never held in memory whole.

A labelled set is real data: data-free stages may not open it (:func:`dfka.data.guard.check_user_images`).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dfka import storage
from dfka.data.guard import check_user_images
from dfka.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg")
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_FILES = 1_000_000
MAX_FILE_BYTES = 32 << 20
MAX_TOTAL_BYTES = 64 << 30
#: Pillow's own bomb guard, tightened: no test image needs more pixels than this.
MAX_PIXELS = 4096 * 4096


def is_folder_spec(value: str | None) -> bool:
    """Whether an evaluation dataset names a folder (a path or ``s3://``) rather than a built-in set."""
    return bool(value) and (storage.is_s3(value) or "/" in value or value.startswith("."))


@dataclass(frozen=True)
class ImageFolderSet:
    """A checked folder test set: ``files[i]`` has label ``label_names[targets[i]]``."""

    root: str
    files: list[str]
    targets: list[int]
    label_names: list[str]
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images (n, C, H, W) in [0, 1], targets (n,))``, decoded a batch at a time."""
        check_user_images(f"the labelled image folder {self.root}")
        for start in range(0, len(self.files), batch_size):
            chunk = self.files[start : start + batch_size]
            images = np.stack([_decode(self.root, f, self.shape) for f in chunk])
            yield torch.from_numpy(images), torch.tensor(self.targets[start : start + batch_size])


def _fix(root: str) -> str:
    return f"lay {root} out as LABEL/IMAGE.png (one folder per label name; PNG or JPEG files)"


def _read(root: str, rel: str) -> bytes:
    data = storage.get_bytes(storage.join(root, rel))
    if len(data) > MAX_FILE_BYTES:
        raise DataError(f"{root}/{rel} is {len(data)} bytes, over {MAX_FILE_BYTES}", "is it an image?")
    return data


def _image(root: str, rel: str, data: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise DataError(
                f"{root}/{rel} is {img.width}x{img.height} pixels", "test images must be the teachers' size"
            )
        return img
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{root}/{rel} is not a readable image ({type(err).__name__}: {err})",
            "remove or replace that file (PNG or JPEG)",
        ) from None


def _decode(root: str, rel: str, shape: tuple[int, int, int]) -> np.ndarray:
    img = _image(root, rel, _read(root, rel))
    try:
        arr = np.asarray(img.convert("L" if shape[0] == 1 else "RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:  # a header that parses but a body that does not
        raise DataError(
            f"{root}/{rel} is not a readable image ({type(err).__name__}: {err})",
            "remove or replace that file (PNG or JPEG)",
        ) from None
    return arr[None] if shape[0] == 1 else arr.transpose(2, 0, 1).copy()


def open_folder(
    root: str, labels: Sequence[str], shape: Sequence[int], task: str = "multiclass"
) -> ImageFolderSet:
    """List and check a folder test set against the target labels ``labels`` and input ``shape``.

    Every image's header is read (format, size, mode) and decoded once, so an unreadable file, a wrong
    size or an unknown label folder is one :class:`~dfka.errors.DataError` before anything trains.
    Images of labels outside ``labels`` are an error too (silently dropping them would change the
    metric); label folders with no images are allowed (the label then has no test images).
    """
    check_user_images(f"the labelled image folder {root}")
    if task != "multiclass":
        raise DataError(
            f"a folder test set has one label per image, but the teachers are {task}",
            "score multi-label teachers on a built-in dataset (evaluation.dataset: mosaic)",
        )
    c, h, w = (int(s) for s in shape)
    if c not in (1, 3):
        raise DataError(
            f"teachers take {c}-channel inputs", "folder test sets hold grey (1) or RGB (3) images"
        )
    names = storage.listdir(root)
    if not names:
        raise DataError(f"{root} holds no files (or does not exist)", _fix(root))
    if len(names) > MAX_FILES:
        raise DataError(f"{root} holds {len(names)} files, over {MAX_FILES}", "split the test set")
    by_lower = {label.lower(): i for i, label in enumerate(labels)}
    files, targets, unknown, stray = [], [], set(), []
    for rel in names:
        parts = rel.split("/")
        if parts[-1].startswith("."):
            continue  # .DS_Store and the like
        if len(parts) != 2 or not rel.lower().endswith(SUFFIXES):
            stray.append(rel)
            continue
        label = parts[0]
        if not _SAFE_LABEL.match(label):
            raise DataError(f"{root}: folder {label!r} is not a safe label name", _fix(root))
        if label.lower() not in by_lower:
            unknown.add(label)
            continue
        files.append(rel)
        targets.append(by_lower[label.lower()])
    if unknown:
        raise DataError(
            f"{root} has images of labels the TargetNet does not predict: {', '.join(sorted(unknown))}",
            f"remove those folders, or choose target labels that include them (labels: {', '.join(labels)})",
        )
    if stray:
        raise DataError(
            f"{root} has {len(stray)} file(s) outside LABEL/IMAGE.png, e.g. {stray[0]}", _fix(root)
        )
    if not files:
        raise DataError(f"{root} holds no PNG or JPEG images", _fix(root))
    total = 0
    for rel in files:
        data = _read(root, rel)
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise DataError(f"{root} is over {MAX_TOTAL_BYTES} bytes", "evaluate on a smaller test set")
        img = _image(root, rel, data)
        if img.size != (w, h):
            raise DataError(
                f"{root}/{rel} is {img.width}x{img.height}; the teachers take {w}x{h}",
                f"resize the test images to {w}x{h} the way the teachers' training images were",
            )
        _decode(root, rel, (c, h, w))  # a truncated body fails here, not mid-evaluation
    return ImageFolderSet(root, files, targets, list(labels), (c, h, w))
