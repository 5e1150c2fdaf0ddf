"""Decoded-array cache files: written atomically, read without pickle.

A cache that a crash left half-written, or that someone edited, must not be trusted, so reads check the
expected keys, dtypes and shapes and report a bad file as ``None`` (the caller rebuilds it).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: key -> (dtype, shape); ``None`` in a shape matches any length.
Spec = dict[str, tuple[str, tuple[int | None, ...]]]


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` atomically (uncompressed: a warm load must be fast). False if not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)  # type: ignore[arg-type]
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache should be readable like any download
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        log.warning(
            "could not write the data cache %s (%s); the data will be decoded again next time", path, err
        )
        return False
    return True


def load_npz(path: Path, spec: Spec, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray] | None:
    """Read ``keys`` (default: all of ``spec``) from ``path``; ``None`` if the file is absent or does not match."""
    keys = tuple(spec) if keys is None else keys
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {k: npz[k] for k in keys}
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        log.warning("ignoring unreadable data cache %s (%s)", path, err)
        return None
    for key, arr in out.items():
        dtype, shape = spec[key]
        if (
            arr.dtype != np.dtype(dtype)
            or len(arr.shape) != len(shape)
            or any(want is not None and got != want for got, want in zip(arr.shape, shape))
        ):
            log.warning(
                "ignoring data cache %s: %s is %s%s, expected %s%s",
                path,
                key,
                arr.dtype,
                arr.shape,
                dtype,
                shape,
            )
            return None
    return out
