"""Multi-label data built from real images: 2x2 mosaics of MNIST digits and Fashion-MNIST garments.

No natural multi-label image set is reachable offline, so each 56x56 image holds 1-4 real 28x28 tiles
(the rest of the cells black), and its label is the 20-dim multi-hot over ``ALL_LABELS`` (digits first,
then garments): teacher A can own the digit labels and teacher B the garment labels. Training mosaics are
cut only from training images and test mosaics only from test images, so no test tile is ever seen in
training. A seed makes a mosaic set reproducible; built sets are cached as npz keyed by
(split, n, seed, tile counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfka.data._npz import Spec, load_npz, save_npz
from dfka.data.fashion import fashion_arrays
from dfka.data.guard import check_split
from dfka.data.labels import ALL_LABELS
from dfka.data.mnist import mnist_arrays
from dfka.errors import ConfigError
from dfka.settings import data_dir

log = logging.getLogger(__name__)

TRAIN_SIZE = 20_000
TEST_SIZE = 4_000
DEFAULT_SEED = 0
DEFAULT_TILES = (1, 4)
TILE = 28
SIZE = 2 * TILE
FORMAT_VERSION = 1
_SPLIT_CODE = {"train": 0, "test": 1}  # mixed into the seed so train and test draw different streams


@dataclass(frozen=True)
class Mosaics:
    """A mosaic set. ``sources[i, cell]`` is -1 for an empty cell, else the tile's index in the split's pool:
    ``0..N_mnist-1`` for MNIST images, ``N_mnist + j`` for Fashion image ``j`` (cells in row-major order)."""

    images: np.ndarray  # uint8 (n, 56, 56)
    targets: np.ndarray  # float32 (n, 20) multi-hot over ALL_LABELS
    sources: np.ndarray  # int64 (n, 4)
    split: str
    seed: int

    def __len__(self) -> int:
        return len(self.images)


def default_size(split: str) -> int:
    return TRAIN_SIZE if split == "train" else TEST_SIZE


def cache_path(split: str, n: int, seed: int, tiles: tuple[int, int]) -> Path:
    lo, hi = tiles
    return data_dir() / "mosaic" / f"mosaic-{split}-n{n}-seed{seed}-tiles{lo}to{hi}-v{FORMAT_VERSION}.npz"


def _check_args(split: str, n: int, seed: int, tiles: tuple[int, int]) -> None:
    if split not in _SPLIT_CODE:
        raise ConfigError(f"unknown split {split!r}", "use 'train' or 'test'")
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
        raise ConfigError(
            f"mosaic count must be a positive integer, got {n!r}", f"e.g. n={default_size(split)}"
        )
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"mosaic seed must be a non-negative integer, got {seed!r}", "e.g. seed=0")
    try:
        lo, hi = (int(t) for t in tiles)
    except (TypeError, ValueError):
        lo, hi = 0, 0
    if not (1 <= lo <= hi <= 4):
        raise ConfigError(
            f"tiles per mosaic must satisfy 1 <= min <= max <= 4, got {tiles!r}", "e.g. tiles=(1, 4)"
        )


def build_mosaics(
    split: str,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
    tiles: tuple[int, int] = DEFAULT_TILES,
    *,
    cache: bool = True,
) -> Mosaics:
    """Build (or read from cache) ``n`` mosaics of ``split``; ``tiles`` bounds the tile count, drawn uniformly.

    Each tile picks MNIST or Fashion with equal odds, then a uniform image of that split (with replacement).
    Guarded: a data-free stage cannot build training mosaics.
    """
    n = default_size(split) if n is None else n
    _check_args(split, n, seed, tiles)
    n, seed, tiles = int(n), int(seed), (int(tiles[0]), int(tiles[1]))
    check_split(split, "the MNIST/Fashion-MNIST mosaics")
    path = cache_path(split, n, seed, tiles)
    spec: Spec = {
        "images": ("uint8", (n, SIZE, SIZE)),
        "targets": ("float32", (n, len(ALL_LABELS))),
        "sources": ("int64", (n, 4)),
        "format_version": ("int64", ()),
    }
    if cache:
        got = load_npz(path, spec)
        if got is not None and int(got["format_version"]) == FORMAT_VERSION:
            return Mosaics(got["images"], got["targets"], got["sources"], split, seed)
    mosaics = _build(split, n, seed, tiles)
    if cache:
        arrays = {
            "images": mosaics.images,
            "targets": mosaics.targets,
            "sources": mosaics.sources,
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        }
        save_npz(path, arrays)
    return mosaics


def _build(split: str, n: int, seed: int, tiles: tuple[int, int]) -> Mosaics:
    xm, ym = mnist_arrays(split)
    xf, yf = fashion_arrays(split)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])

    counts = rng.integers(tiles[0], tiles[1] + 1, size=n)
    cell_order = np.argsort(rng.random((n, 4)), axis=1)  # a random permutation of the 4 cells per mosaic
    rows, pos = np.nonzero(np.arange(4)[None, :] < counts[:, None])  # the first `count` cells of that order
    cells = cell_order[rows, pos]
    n_tiles = len(rows)
    from_fashion = rng.random(n_tiles) < 0.5
    idx_m = rng.integers(0, len(xm), size=n_tiles)
    idx_f = rng.integers(0, len(xf), size=n_tiles)

    grid = np.zeros((n, 4, TILE, TILE), dtype=np.uint8)
    sources = np.full((n, 4), -1, dtype=np.int64)
    targets = np.zeros((n, len(ALL_LABELS)), dtype=np.float32)
    m = ~from_fashion
    grid[rows[m], cells[m]] = xm[idx_m[m]]
    grid[rows[from_fashion], cells[from_fashion]] = xf[idx_f[from_fashion]]
    sources[rows[m], cells[m]] = idx_m[m]
    sources[rows[from_fashion], cells[from_fashion]] = len(xm) + idx_f[from_fashion]
    targets[rows[m], ym[idx_m[m]]] = 1.0
    targets[rows[from_fashion], 10 + yf[idx_f[from_fashion]]] = 1.0  # garments follow the 10 digits

    images = grid.reshape(n, 2, 2, TILE, TILE).transpose(0, 1, 3, 2, 4).reshape(n, SIZE, SIZE)
    return Mosaics(np.ascontiguousarray(images), targets, sources, split, seed)


def split_tiles(images: np.ndarray) -> np.ndarray:
    """The 4 cells of each mosaic, ``(n, 56, 56) -> (n, 4, 28, 28)`` in row-major cell order."""
    n = len(images)
    return images.reshape(n, 2, TILE, 2, TILE).transpose(0, 1, 3, 2, 4).reshape(n, 4, TILE, TILE)
