"""Wall-clock probes: score the model being trained at regular intervals, outside its time budget.

A benchmark wants accuracy-vs-time *curves*, not just end points, without the scoring stealing training
time and without it feeding back into training. :func:`probing` installs a :class:`TimeProbe` for the
current context; every :func:`~dfka.engine.loop.run_loop` that is told which ``model`` it trains
calls :meth:`TimeProbe.maybe` after each step. The probe scores the model when the next tick is due,
with every module's train/eval mode and the autograd state restored afterwards, and the loop moves its
clock forward by the probe's own time, so a time budget buys the same training with or without a probe.
Loops that train no complete model yet (the GAN, the dual-generator blocks, auto-encoders) pass none, so
a method's curve starts when it has a model to score. Probe scores are recorded, never used to choose.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

Score = Callable[[nn.Module], float]

_ACTIVE: ContextVar[TimeProbe | None] = ContextVar("dfka_time_probe", default=None)


@dataclass
class TimeProbe:
    """Scores ``model`` every ``every`` seconds of training wall-clock (probe time excluded)."""

    every: float
    score: Score
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    spent: float = 0.0  # seconds spent scoring, excluded from ``elapsed``
    _origin: float = field(default_factory=time.perf_counter)
    _next: float = 0.0

    def __post_init__(self) -> None:
        if not self.every > 0:
            raise ValueError(f"probe interval must be positive, got {self.every}")

    def elapsed(self) -> float:
        """Training wall-clock since the probe was created, without the probe's own time."""
        return time.perf_counter() - self._origin - self.spent

    def maybe(self, model: nn.Module, force: bool = False) -> float:
        """Score ``model`` if a tick is due (or ``force``: a loop's last step); returns the seconds spent."""
        at = self.elapsed()
        if at < self._next and not force:
            return 0.0
        start = time.perf_counter()
        modes = [m.training for m in model.modules()]
        try:
            model.eval()  # scoring must not move BatchNorm statistics
            with torch.no_grad():
                value = float(self.score(model))
        finally:
            for m, mode in zip(model.modules(), modes, strict=True):
                m.training = mode
        self.seconds.append(at)
        self.values.append(value)
        self._next = (at // self.every + 1) * self.every
        spent = time.perf_counter() - start
        self.spent += spent
        return spent

    def curve(self) -> dict[str, list[float]]:
        return {"seconds": list(self.seconds), "values": list(self.values)}


def active_probe() -> TimeProbe | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def probing(probe: TimeProbe) -> Iterator[TimeProbe]:
    """Install ``probe`` for the training loops run inside the ``with`` block."""
    token = _ACTIVE.set(probe)
    try:
        yield probe
    finally:
        _ACTIVE.reset(token)


def time_to_reach(curve: dict[str, list[float]], target: float) -> float | None:
    """The first probe time at which the curve reached ``target``, or None if it never did."""
    for t, v in zip(curve.get("seconds", []), curve.get("values", []), strict=False):
        if v >= target:
            return float(t)
    return None
