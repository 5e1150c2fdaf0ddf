"""The data-free guard: stages that must not see real training images cannot load them.

Data-free amalgamation is only honest if the generator/student stages never touch the training set.
Rather than trust every caller, the loaders themselves call :func:`check_split` before handing out
training images. The guard is switched on either by the :func:`data_free` context manager or by the
environment variable ``DFKA_DATA_FREE`` (``1`` or a stage name), which KFP components and any other
subprocess inherit; :func:`data_free` sets that variable for its duration for exactly that reason.
Test-split reads stay allowed, because evaluating the student on held-out data is not training on it.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dfka.errors import DataFreeViolation

ENV_VAR = "DFKA_DATA_FREE"
_OFF = {"", "0", "false", "no", "off"}
_GENERIC_ON = {"1", "true", "yes", "on"}

_lock = threading.Lock()
_active: list[tuple[int, str]] = []  # (token, reason) of the open data_free() blocks, innermost last
_outer_env: str | None = None  # the value of ENV_VAR before the outermost data_free() block
_tokens = itertools.count()


def is_data_free() -> bool:
    """True when this process (or an ancestor that set ``DFKA_DATA_FREE``) is in a data-free stage."""
    return os.environ.get(ENV_VAR, "").strip().lower() not in _OFF


def data_free_reason() -> str | None:
    """The stage/reason that switched the guard on, or None when it is off."""
    if not is_data_free():
        return None
    with _lock:
        if _active:
            return _active[-1][1]
    value = os.environ.get(ENV_VAR, "").strip()
    return f"{ENV_VAR}={value}" if value.lower() in _GENERIC_ON else value


@contextmanager
def data_free(reason: str) -> Iterator[None]:
    """Forbid reading training images inside the block (and in subprocesses started from it).

    ``reason`` names the stage (e.g. ``"generator training"``); it is quoted in the violation error.
    """
    global _outer_env
    reason = reason.strip()
    if reason.lower() in _OFF:  # the reason is exported as the variable's value, so it must read as "on"
        reason = f"data-free stage {reason}" if reason else "data-free stage"
    token = next(_tokens)
    with _lock:
        if not _active:
            _outer_env = os.environ.get(ENV_VAR)
        _active.append((token, reason))
        os.environ[ENV_VAR] = reason
    try:
        yield
    finally:
        with _lock:
            _active[:] = [entry for entry in _active if entry[0] != token]
            if _active:
                os.environ[ENV_VAR] = _active[-1][1]
            elif _outer_env is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = _outer_env


def check_split(split: str, what: str) -> None:
    """Raise :class:`DataFreeViolation` if ``what`` (a description of the data) is training data in a data-free stage."""
    if split != "train" or not is_data_free():
        return
    reason = data_free_reason()
    raise DataFreeViolation(
        f"data-free stage ({reason}) tried to read the training split of {what}; "
        "data-free stages may not read training images",
        f"only the test split may be read here (for evaluation); load training data in a stage that is not "
        f"data-free, i.e. outside `data_free(...)` and without {ENV_VAR} set",
    )


def check_user_images(what: str) -> None:
    """Raise :class:`DataFreeViolation` if a data-free stage opens a user's labelled image set.

    Stricter than :func:`check_split`: a user's folder has no "test split" dfka can vouch for (it may be
    the teachers' training data), so no data-free stage may read any of it.
    """
    if not is_data_free():
        return
    raise DataFreeViolation(
        f"data-free stage ({data_free_reason()}) tried to read {what}; data-free stages may not read "
        "real images",
        "read the labelled set in the evaluation step only (outside `data_free(...)`, without "
        f"{ENV_VAR} set)",
    )
