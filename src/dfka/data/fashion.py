"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

Debian is the only reachable registry that ships the genuine Fashion-MNIST (see
``shared/platform/datasets.md``). The files are plain IDX (no code runs to read them); their headers and
sizes are validated, and each split is cached as npz in the data directory because gunzipping the
training images costs ~0.5 s per process otherwise.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from dfka.data._npz import Spec, load_npz, save_npz
from dfka.data.guard import check_split
from dfka.errors import DataError
from dfka.settings import data_dir

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "DFKA_FASHION_DIR"
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIZES = {"train": 60_000, "test": 10_000}
FORMAT_VERSION = 1
INSTALL_FIX = (
    f"install it: `sudo apt-get install {DEBIAN_PACKAGE}` (run `apt-get update` first if apt cannot find it); "
    f"or set {ENV_DIR} to a folder holding the four *-ubyte(.gz) IDX files; or, without installing: "
    f"`apt-get download {DEBIAN_PACKAGE} && dpkg -x {DEBIAN_PACKAGE}_*.deb DIR` and "
    f"{ENV_DIR}=DIR{DEFAULT_DIR}"
)


def fashion_dir() -> Path:
    """Where the IDX files are looked for: ``$DFKA_FASHION_DIR`` or the Debian location."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser().absolute() if env else DEFAULT_DIR


def _locate(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def fashion_files(root: Path | None = None) -> dict[str, Path]:
    """Paths of the four IDX files (gzipped or not); DataError naming the missing ones and the fix."""
    root = root or fashion_dir()
    found = {stem: _locate(root, stem) for pair in FILES.values() for stem in pair}
    missing = [stem for stem, path in found.items() if path is None]
    if missing:
        origin = f" (from {ENV_DIR})" if os.environ.get(ENV_DIR) else ""
        raise DataError(
            f"Fashion-MNIST is not available: {', '.join(f'{m}.gz' for m in missing)} not found in {root}{origin}",
            INSTALL_FIX,
        )
    return {stem: path for stem, path in found.items() if path is not None}


def fashion_available(root: Path | None = None) -> bool:
    """True if all four Fashion-MNIST IDX files are present."""
    try:
        fashion_files(root)
    except DataError:
        return False
    return True


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a ubyte IDX file (optionally gzipped), checking its magic number and that the size matches the header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(
            f"cannot read {path}: {err}", f"the file is damaged; reinstall it. {INSTALL_FIX}"
        ) from err
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        got = raw[:4].hex() if len(raw) >= 4 else "too short"
        raise DataError(
            f"{path} is not a {ndim}-d ubyte IDX file (magic {got}, expected 0000080{ndim})",
            f"point {ENV_DIR} at the original Fashion-MNIST files. {INSTALL_FIX}",
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes but its header {dims} says {expected}",
            f"the file is truncated or damaged; reinstall it. {INSTALL_FIX}",
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _decode(files: dict[str, Path], split: str) -> dict[str, np.ndarray]:
    img_stem, lab_stem = FILES[split]
    x, y = read_idx(files[img_stem], 3), read_idx(files[lab_stem], 1)
    n = SIZES[split]
    if x.shape != (n, 28, 28) or y.shape != (n,):
        raise DataError(
            f"Fashion-MNIST {split} has images {x.shape} and labels {y.shape}, expected ({n}, 28, 28) and ({n},)",
            f"these are not the official Fashion-MNIST files. {INSTALL_FIX}",
        )
    if int(y.max()) > 9:
        raise DataError(f"Fashion-MNIST {split} labels go up to {int(y.max())}, expected 0..9", INSTALL_FIX)
    return {
        "x": np.ascontiguousarray(x),
        "y": y.astype(np.int64),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
    }


def _source_key(files: dict[str, Path], split: str) -> str:
    """Identify the source files, so the cache follows a reinstall or a different DFKA_FASHION_DIR."""
    parts = []
    for stem in FILES[split]:
        path = files[stem].resolve()
        st = path.stat()
        parts.append(f"{path}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def _load(split: str, cache_file: str, files: tuple[tuple[str, Path], ...]) -> tuple[np.ndarray, np.ndarray]:
    n = SIZES[split]
    spec: Spec = {"x": ("uint8", (n, 28, 28)), "y": ("int64", (n,)), "format_version": ("int64", ())}
    arrays = load_npz(Path(cache_file), spec)
    if arrays is None or int(arrays["format_version"]) != FORMAT_VERSION:
        arrays = _decode(dict(files), split)
        save_npz(Path(cache_file), arrays)
    x, y = arrays["x"], arrays["y"]
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _cached(split: str) -> tuple[np.ndarray, np.ndarray]:
    files = fashion_files()
    cache_file = data_dir() / f"fashion-mnist-{split}-{_source_key(files, split)}.npz"
    return _load(split, str(cache_file), tuple(sorted(files.items())))


def fashion_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``(images uint8 (N,28,28), labels int64 (N,))`` of the official split. Guarded."""
    if split not in SIZES:
        raise DataError(f"unknown split {split!r}", "use 'train' or 'test'")
    check_split(split, "Fashion-MNIST")
    return _cached(split)


def prepare_fashion() -> int:
    """Validate both splits and write their npz caches (setup step; hands out no images). Returns the image count."""
    return sum(len(_cached(split)[0]) for split in SIZES)
