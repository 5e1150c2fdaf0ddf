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

A **folder dataset** (the benchmarks' form, e.g. ``dataset: $DFKA_DATA_DIR/rgb-mnist-32``) is two such
trees and a label order: ``ROOT/train/LABEL/...``, ``ROOT/test/LABEL/...`` and optionally
``ROOT/labels.txt`` (one name per line; default: the sorted folder names of ``train/``).
:func:`load_folder_split` reads one split into memory (teacher training and the benchmarks need it
whole) behind the same guard as the built-in datasets: ``train`` is refused in a data-free stage.
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
#: A folder dataset's label order, one name per line (optional).
LABELS_FILE = "labels.txt"
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_FILES = 1_000_000
MAX_FILE_BYTES = 32 << 20
MAX_TOTAL_BYTES = 64 << 30
#: Pillow's own bomb guard, tightened: no test image needs more pixels than this.
MAX_PIXELS = 4096 * 4096


def is_folder_spec(value: str | None) -> bool:
    """Whether an evaluation dataset names a folder (a path or ``s3://``) rather than a built-in set."""
    return bool(value) and (storage.is_s3(value) or "/" in value or value.startswith((".", "~", "$")))


def expand(spec: str) -> str:
    """``~`` and ``$VARS`` of a folder spec expanded; ``$DFKA_DATA_DIR`` has dfka's default when unset."""
    import os

    from dfka.settings import data_dir

    if storage.is_s3(spec):
        return spec
    spec = spec.replace("${DFKA_DATA_DIR}", "$DFKA_DATA_DIR").replace("$DFKA_DATA_DIR", str(data_dir()))
    return os.path.expandvars(os.path.expanduser(spec))


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


def dataset_labels(root: str) -> list[str]:
    """The label order of the folder dataset ``root``: ``labels.txt`` if present, else ``train/``'s folders."""
    root = expand(root)
    children = storage.listdir(root, recursive=False)
    if "train/" not in children or "test/" not in children:
        raise DataError(
            f"{root} is not a folder dataset (it needs train/ and test/ folders)",
            "lay it out as ROOT/train/LABEL/IMAGE.png and ROOT/test/LABEL/IMAGE.png "
            "(`dfka data rgb mnist` makes one from the installed MNIST)",
        )
    if LABELS_FILE in children:
        names = storage.get_bytes(storage.join(root, LABELS_FILE)).decode("utf-8", "replace").split()
    else:
        names = sorted(c.rstrip("/") for c in storage.listdir(storage.join(root, "train"), recursive=False))
        names = [n for n in names if not n.startswith(".")]
    bad = [n for n in names if not _SAFE_LABEL.match(n)]
    if bad or not names or len(set(n.lower() for n in names)) != len(names):
        raise DataError(
            f"{root}: label names {bad or names} are not unique safe names",
            "use 1-64 letters, digits, '_' or '-' per label, each once (labels.txt or the folder names)",
        )
    return names


def load_folder_split(
    root: str, split: str, labels: Sequence[str], task: str = "multiclass"
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``split`` of the folder dataset ``root`` over ``labels``: ``(uint8 (N, C, H, W), int64 (N,))``.

    Images of other labels are skipped (a label subset, as for the built-in datasets); every kept image
    must have the size and channel count of the first one.
    """
    from dfka.data.guard import check_split

    root = expand(root)
    check_split(split, f"the {split} split of the folder dataset {root}")
    if task != "multiclass":
        raise DataError(
            f"a folder dataset has one label per image, so it has no {task} targets", "use task multiclass"
        )
    where = storage.join(root, split)
    by_lower = {label.lower(): i for i, label in enumerate(labels)}
    files = [
        (rel, by_lower[rel.split("/")[0].lower()])
        for rel in storage.listdir(where)
        if rel.count("/") == 1 and rel.lower().endswith(SUFFIXES) and rel.split("/")[0].lower() in by_lower
    ]
    if not files:
        raise DataError(f"{where} holds no images of labels {', '.join(labels)}", _fix(where))
    if len(files) > MAX_FILES:
        raise DataError(f"{where} holds {len(files)} images, over {MAX_FILES}", "use a smaller dataset")
    first = _image(where, files[0][0], _read(where, files[0][0]))
    shape = (1 if first.mode in ("L", "1", "I;16", "I") else 3, first.height, first.width)
    images = np.empty((len(files), *shape), np.uint8)
    for i, (rel, _) in enumerate(files):
        img = _image(where, rel, _read(where, rel))
        if img.size != first.size:
            raise DataError(
                f"{where}/{rel} is {img.width}x{img.height}, the first image {first.width}x{first.height}",
                "every image of a folder dataset must have the same size",
            )
        images[i] = _pixels(where, rel, img, shape[0])
    return images, np.array([t for _, t in files], np.int64)


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


def _pixels(root: str, rel: str, img, channels: int) -> np.ndarray:
    """uint8 ``(C, H, W)`` of a Pillow image, converted to grey (1) or RGB (3)."""
    try:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:  # a header that parses but a body that does not
        raise DataError(
            f"{root}/{rel} is not a readable image ({type(err).__name__}: {err})",
            "remove or replace that file (PNG or JPEG)",
        ) from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _decode(root: str, rel: str, shape: tuple[int, int, int]) -> np.ndarray:
    img = _image(root, rel, _read(root, rel))
    return _pixels(root, rel, img, shape[0]).astype(np.float32) / 255.0


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
