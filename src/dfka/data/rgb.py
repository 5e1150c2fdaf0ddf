"""An RGB dataset in the user's folder format, made from the installed grey data.

No registry package ships an RGB image dataset offline (see the README's benchmark notes), so the RGB
benchmark is built the way a user would bring one: a folder tree of PNG files, made here from MNIST or
Fashion-MNIST. Each image is padded to ``size`` x ``size`` and coloured: its strokes get one colour and
its background another, both drawn per image, so colour carries no label information and the teachers
must learn shape from three channels::

    OUT/labels.txt                     the label order (one name per line)
    OUT/train/LABEL/00000.png ...      the source's training split
    OUT/test/LABEL/00000.png ...       its test split

``pixel = bg * (1 - a) + fg * a`` with ``a`` the grey value in [0, 1], ``bg`` uniform in [0, 0.5]^3 and
``fg`` uniform in [0.5, 1]^3 per image (a fixed seed per split: the same command writes the same files).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dfka.data.folder import LABELS_FILE
from dfka.errors import ConfigError
from dfka.progress import bar as progress_bar

SOURCES = ("mnist", "fashion")


def colourise(grey: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """``(N, H, W)`` uint8 grey -> ``(N, size, size, 3)`` uint8 RGB, centred, one colour pair per image."""
    n, h, w = grey.shape
    if size < max(h, w):
        raise ConfigError(f"size {size} is below the source's {h}x{w}", f"use --size {max(h, w)} or more")
    top, left = (size - h) // 2, (size - w) // 2
    alpha = np.zeros((n, size, size, 1), np.float32)
    alpha[:, top : top + h, left : left + w, 0] = grey / 255.0
    bg = rng.uniform(0.0, 0.5, (n, 1, 1, 3)).astype(np.float32)
    fg = rng.uniform(0.5, 1.0, (n, 1, 1, 3)).astype(np.float32)
    return np.rint(255.0 * (bg * (1 - alpha) + fg * alpha)).astype(np.uint8)


def make_rgb_folder(
    source: str,
    out: str | Path,
    *,
    size: int = 32,
    seed: int = 0,
    per_label: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Write ``source`` (``mnist`` or ``fashion``) as an RGB folder dataset under ``out``.

    ``per_label`` keeps only the first N images of each label per split (small sets for tests).
    Returns the number of images written per split. Refuses a non-empty ``out``, so nothing is mixed.
    """
    from PIL import Image

    from dfka.data.loader import load_split

    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}", f"use one of: {', '.join(SOURCES)}")
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root} is not empty", "choose a new folder, or remove this one first")
    counts: dict[str, int] = {}
    labels: list[str] = []
    for split_index, split in enumerate(("train", "test")):
        part = load_split(source, split)
        labels = part.label_names
        keep = np.arange(len(part))
        if per_label is not None:
            keep = np.concatenate([np.flatnonzero(part.targets == i)[:per_label] for i in range(len(labels))])
            keep.sort()
        rng = np.random.default_rng([seed, split_index])
        rgb = colourise(part.images[keep, 0], rng, size)
        for label in labels:
            (root / split / label).mkdir(parents=True, exist_ok=True)
        bar = progress_bar(zip(keep, rgb), total=len(keep), desc=f"{source} {split}", progress=progress)
        for index, image in bar:
            buf = io.BytesIO()
            Image.fromarray(image, "RGB").save(buf, format="PNG")
            (root / split / labels[part.targets[index]] / f"{index:05d}.png").write_bytes(buf.getvalue())
        counts[split] = len(keep)
    (root / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels))
    return counts
