"""Data-parallel training stages on ``torch.distributed``: one global batch, split across ranks.

Launched by ``torchrun`` (``dfka amalgamate --nproc N`` does that locally; a GPU stage with
``accelerator_count: N`` does it in its pod), each training stage detects the environment
(``WORLD_SIZE`` > 1) and joins the process group: gloo on CPU, NCCL on GPUs. Every rank draws the
same random numbers (same seeds), so every rank knows the whole global batch of latent codes,
permutation indices and augmentation offsets, and computes only its own contiguous share of the
samples: rank ``r`` of ``W`` owns rows ``[r·B/W, (r+1)·B/W)``. The loss a rank computes is then
exactly the one-process loss on the same global batch, to float tolerance:

* a per-sample mean over an equal share is averaged across ranks by the gradient all-reduce
  (:func:`average_gradients`, what DistributedDataParallel does after backward);
* every statistic over the batch (BatchNorm moments, the DAFL balance term, means over a subset
  of the samples, pairs of samples) is reduced across ranks inside the graph
  (:func:`global_sum`, :func:`gather`: autograd-aware collectives), so its value is the global one on
  every rank and its gradient reaches every rank's samples;
* BatchNorm layers that train (generator, student) normalise with global batch statistics
  (:func:`sync_batchnorm`; ``nn.SyncBatchNorm`` refuses CPU tensors).

Why not the ``DistributedDataParallel`` wrapper itself: its reducer expects every forward through the
wrapper and every trainable parameter used in every step, and the stages switch their trainable set
block by block (stage 2) and leave parameters unused by configuration. One coalesced all-reduce of
the gradients after backward is the same arithmetic.

With one process every helper returns its input or the plain expression: a single-process run is
bit-identical to one without this module.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dfka.errors import ConfigError

# the autograd-aware collectives of torch.distributed.nn.functional are what this module needs; their
# proposed successor (torch.distributed._functional_collectives) is private
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional", category=FutureWarning)

#: seconds a collective waits for a rank that stopped answering before the stage fails (no hang)
TIMEOUT_ENV, DEFAULT_TIMEOUT = "DFKA_DIST_TIMEOUT", 120.0


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a stage (``size == 1``: a plain single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, outputs, metrics and progress; the others only train."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` samples."""
        if self.size == 1:
            return slice(0, n)
        if n % self.size:
            raise ConfigError(
                f"a global batch of {n} samples does not split evenly across {self.size} ranks",
                f"use batch sizes (and regroup.origin.mix x batch_size) that are multiples of {self.size}, "
                "or another number of processes",
            )
        share = n // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


_PROCESS = World()  # the ranks this process belongs to
_WORLD = World()  # what the batch helpers see: the ranks inside ``sharded()``, one process outside


def world() -> World:
    """The ranks the current global batch is split across (one process outside :func:`sharded`)."""
    return _WORLD


def process() -> World:
    """The ranks this process belongs to, in or out of a training loop (rank 0 writes the outputs)."""
    return _PROCESS


@contextmanager
def sharded() -> Iterator[World]:
    """Around a training loop: the batch helpers split and reduce across the ranks. Outside it (rank 0
    writing outputs, calibrating, evaluating) every helper is the single-process expression, so no
    rank ever waits in a collective the others do not reach."""
    global _WORLD
    before, _WORLD = _WORLD, _PROCESS
    try:
        yield _WORLD
    finally:
        _WORLD = before


def launched() -> bool:
    """Started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(
            f"{TIMEOUT_ENV}={raw!r} is not a number of seconds", "set it to e.g. 120, or unset it"
        )
    return value


def init_from_env(device: torch.device | None = None) -> World:
    """Join the process group ``torchrun`` set up (idempotent); a single process stays as it is."""
    global _PROCESS
    if not launched():
        return _PROCESS
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(local)
    _PROCESS = World(dist.get_rank(), dist.get_world_size(), local)
    return _PROCESS


def rank_device(device: torch.device) -> torch.device:
    """One GPU per rank (``LOCAL_RANK``) under ``torchrun``; the device as given otherwise."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown() -> None:
    global _PROCESS, _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _PROCESS = _WORLD = World()


# ---------------------------------------------------------------- reductions inside the graph


def global_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks; the gradient flows back to every rank's contribution."""
    if _WORLD.size == 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's share concatenated along dim 0, in rank order: the global batch (differentiable)."""
    if _WORLD.size == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor every rank holds whole (a global batch)."""
    return t if _WORLD.size == 1 else t[_WORLD.rows(t.shape[0])]


def global_rows(n_local: int) -> int:
    """The global batch size of which this rank holds ``n_local`` rows."""
    return n_local * _WORLD.size


def mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every element on every rank (the shares may differ in size, e.g. a subset)."""
    if _WORLD.size == 1:
        return x.mean()
    count = global_sum(torch.tensor(float(x.numel()), device=x.device))
    return global_sum(x.sum()) / count.clamp_min(1)


def batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over the global batch (dim 0) of an equal share per rank."""
    if _WORLD.size == 1:
        return x.mean(0)
    return global_sum(x.sum(0)) / global_rows(x.shape[0])


def per_sample_total(total: torch.Tensor, n_local: int) -> torch.Tensor:
    """``total / n``: a sum over this rank's ``n_local`` samples as a mean over all ranks' samples."""
    if _WORLD.size == 1:
        return total / n_local
    count = global_sum(torch.tensor(float(n_local), device=total.device))
    return global_sum(total) / count.clamp_min(1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` (mean) over the samples of every rank."""
    if _WORLD.size == 1:
        return F.cross_entropy(logits, target)
    return mean(F.cross_entropy(logits, target, reduction="none"))


def moments(mean_: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global per-channel (mean, biased variance) from each rank's moments over an equal share."""
    if _WORLD.size == 1:
        return mean_, var
    w = _WORLD.size
    m = global_sum(mean_) / w
    sq = global_sum(var + mean_ * mean_) / w
    return m, (sq - m * m).clamp_min(0)


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value``."""
    if _WORLD.size == 1:
        return value
    t = torch.tensor(value, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank if it is true on any rank (for branches that must be taken together)."""
    value = bool(flag)
    if _WORLD.size == 1:
        return value
    t = torch.tensor(int(value))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


# ---------------------------------------------------------------- outside the graph


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients over the ranks in one coalesced all-reduce (DDP's arithmetic)."""
    if _WORLD.size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= _WORLD.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_metrics(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each logged value averaged over the ranks (what one process would have logged)."""
    if _WORLD.size == 1 or not values:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].detach().float().reshape(()).cpu() for k in keys])
    dist.all_reduce(flat)
    flat /= _WORLD.size
    return dict(zip(keys, flat.unbind(), strict=True))


def broadcast_numbers(values: Sequence[float]) -> list[float]:
    """Rank 0's numbers on every rank (e.g. a time budget's stop decision and schedule length)."""
    if _WORLD.size == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.broadcast(t, 0)
    return t.tolist()


def broadcast_json(doc: Any) -> Any:
    """Rank 0's JSON-able ``doc`` on every rank (plain JSON bytes: no pickle crosses the ranks)."""
    if _PROCESS.size == 1:
        return doc
    data = json.dumps(doc).encode() if _PROCESS.main else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, 0)
    buf = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if _PROCESS.main
        else torch.empty(int(size), dtype=torch.uint8)
    )
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.tolist()).decode())


def broadcast_tensors(
    tensors: dict[str, torch.Tensor] | None, keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Rank 0's tensors (``keys``, any shapes and dtypes) on every rank; the others pass ``None``."""
    if _PROCESS.size == 1:
        assert tensors is not None
        return tensors
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        meta = torch.zeros(9, dtype=torch.int64)
        if _PROCESS.main:
            t = tensors[key]  # type: ignore[index]
            meta[0] = t.dim()
            meta[1 : 1 + t.dim()] = torch.tensor(t.shape)
            meta[8] = _DTYPES.index(t.dtype)
        dist.broadcast(meta, 0)
        shape = tuple(int(s) for s in meta[1 : 1 + int(meta[0])])
        buf = tensors[key].contiguous() if _PROCESS.main else torch.empty(shape, dtype=_DTYPES[int(meta[8])])  # type: ignore[index]
        dist.broadcast(buf, 0)
        out[key] = buf
    return out


_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


def barrier() -> None:
    if _PROCESS.size > 1:
        dist.barrier()


# ---------------------------------------------------------------- BatchNorm over the global batch


class _GlobalBatchNorm:
    """Training-mode BatchNorm with the moments of the global batch (eval mode: the layer as it was)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if not self.training or _WORLD.size == 1:
            return super().forward(x)  # type: ignore[misc]
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        m, var = moments(x.mean(dims), x.var(dims, unbiased=False))
        if self.track_running_stats and self.running_mean is not None:  # type: ignore[attr-defined]
            total = n * _WORLD.size
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
                self.running_mean.mul_(1 - mom).add_(m.detach(), alpha=mom)  # type: ignore[attr-defined]
                unbiased = var.detach() * total / max(1, total - 1)
                self.running_var.mul_(1 - mom).add_(unbiased, alpha=mom)  # type: ignore[attr-defined]
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - m.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)  # type: ignore[attr-defined]
        if self.affine:  # type: ignore[attr-defined]
            y = y * self.weight.view(shape) + self.bias.view(shape)  # type: ignore[attr-defined]
        return y


class GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    pass


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Make ``module``'s BatchNorm layers normalise with global batch statistics when more than one
    rank trains (in place: parameters, buffers and ``isinstance`` checks stay; no-op for one rank)."""
    if _PROCESS.size == 1:
        return module
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module
