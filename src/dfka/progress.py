"""Progress bars on a terminal, nothing in log files.

tqdm redraws a bar with carriage returns; written to a file or a pipe (kfp.local, CI, ``> log``) those
redraws pile up into one line of many kilobytes. :func:`bar` shows a bar only when stderr is a terminal
(tqdm's ``disable=None``); elsewhere each stage's own summary lines say what happened.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Iterable[Any] | None = None, *, progress: bool = True, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, drawn only if ``progress`` and stderr is a terminal."""
    return tqdm(iterable, disable=None if progress else True, **options)
