"""Process-level runtime settings: threads, seeds, device, timing."""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dfka.errors import ConfigError


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads from ``n``, else ``OMP_NUM_THREADS``, else all cores; return it."""
    if n is None:
        env = os.environ.get("OMP_NUM_THREADS")
        n = int(env) if env and env.isdigit() else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU. Never assumes CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available", "use device: auto or cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None


@contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to ``into[key]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        into[key] = into.get(key, 0.0) + time.perf_counter() - start


@contextmanager
def env_var(key: str, value: str) -> Iterator[None]:
    """Set an environment variable inside the block and restore (or remove) it afterwards."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def ensure_writable_dir(path: str | os.PathLike[str], need_bytes: int = 0, what: str = "--out") -> Path:
    """Create ``path`` if needed and check, before any work, that files can be written there and that
    about ``need_bytes`` are free; a :class:`~dfka.errors.ConfigError` naming the fix otherwise."""
    from dfka.errors import ConfigError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(
            f"{what} {p} is an existing file, not a directory", "pass a directory (created if missing)"
        )
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".dfka-write-check-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{what} {p} is not writable ({err.strerror})", "pick a directory you can write to"
        ) from None
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        raise ConfigError(
            f"{what} {p} has {free / 1e6:.0f} MB free; the output needs about {need_bytes / 1e6:.0f} MB",
            "free some space there or pick another directory",
        )
    return p
