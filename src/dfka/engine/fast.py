"""The fast compute path: what the engine runs instead of the modules it was given, with the same results
up to float rounding.

Frozen teachers are only ever evaluated, so the engine runs a *compute copy* of each (the originals are
never touched):

* **BatchNorm folded** into the preceding conv/linear layer (exact in eval mode). With
  :math:`s = γ/\\sqrt{v+ε}` and :math:`t = β - μ s` the folded layer computes :math:`y = s\\,(Wx+b) + t`.
  The BN-statistics term needs the statistics of the BN *input* :math:`x_{bn} = (y - t)/s`; they are
  recovered from the folded output's moments,

  .. math::  \\operatorname{mean}(x_{bn}) = (\\operatorname{mean}(y) - t)/s,\\qquad
             \\operatorname{var}(x_{bn}) = \\operatorname{var}(y)/s^2 .

  A layer whose :math:`|β/γ|` is large (γ ≈ 0) would lose precision in that division, so it keeps its BN.
* **max-pool before ReLU** (they commute; the gradients are identical, ties included), so the ReLU runs
  on a quarter of the elements;
* **thin convolutions** (one or a few image channels, where oneDNN's kernels run at a few GFLOP/s) through
  a GEMM plus k² shifted adds: the teachers' first conv backward and the generator's image conv;
* **channels-last** activations (oneDNN's native layout on CPU, tensor cores' on CUDA);
* weights held as non-persistent buffers: a compute copy never appears in a ``state_dict`` and never
  gets gradients.

On CUDA the stages also run under ``torch.autocast`` (bfloat16 when supported). The device is always
the caller's; nothing here moves tensors to a GPU by itself.

Which path runs is chosen per object, not per process: a :class:`ComputePath` rides on the teacher set
(``TeacherSet(..., path=REFERENCE)``), and every stage built on that set follows it. ``REFERENCE`` runs
the unmodified modules (for equivalence tests and before/after benchmarks).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfka.models import BlockClassifier

log = logging.getLogger(__name__)

#: a BN is folded only if |β/γ| stays below this for every channel (see the module docstring)
FOLD_MAX_SHIFT_RATIO = 100.0
#: convolutions with at most this many input (or output) channels take the thin-conv path on CPU
THIN_CHANNELS = 4
#: on CPU, nets whose widest conv has fewer channels stay in NCHW (see :func:`preferred_format`)
CHANNELS_LAST_MIN_WIDTH = 32


@dataclass(frozen=True)
class ComputePath:
    """What a stage runs: the fast path (``fast=True``, :data:`FAST`) or the modules as given
    (:data:`REFERENCE`). Stages take it from the teacher set they are built on (``teachers.path``)."""

    fast: bool = True

    def accelerate(self, module: nn.Module, device: torch.device) -> nn.Module:
        """:func:`accelerate` on the fast path; ``module`` unchanged on the reference path."""
        return accelerate(module, device) if self.fast else module

    def adam_options(self, device: torch.device) -> dict[str, Any]:
        """Keyword arguments for ``torch.optim.Adam``: the fused kernel on the fast path (one kernel for
        all parameters instead of a dozen ``foreach`` passes; the same update up to float rounding)."""
        return {"fused": True} if self.fast and device.type in ("cpu", "cuda") else {}

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        """Mixed precision where it helps: bfloat16 autocast on CUDA (when supported), nothing on CPU
        nor on the reference path."""
        if self.fast and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


FAST = ComputePath(fast=True)
REFERENCE = ComputePath(fast=False)


def in_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` (4-d) laid out in ``fmt`` with *exact* strides. With one channel, ``contiguous(channels_last)``
    keeps the NCHW strides (both layouts are the same memory), and oneDNN then picks NCHW for the conv's
    output; an image conv's weight needs the channels-last strides spelled out."""
    if t.dim() != 4 or fmt != torch.channels_last:
        return t.contiguous(memory_format=fmt)
    n, c, h, w = t.shape
    out = t.new_empty(n, h, w, c).permute(0, 3, 1, 2)
    return out.copy_(t)


# --- per-channel moments with a one-pass backward -----------------------------------------------------


class _ChannelMoments(torch.autograd.Function):
    """``(mean, mean of squares)`` per channel (dim 1) over every other dim.

    Autograd through ``x.sum`` and ``x * x`` costs four passes over ``x`` backward; this costs one:
    :math:`\\partial/\\partial x = g_m/M + 2 g_q x / M`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(x)
        c = x.shape[1]
        count = x.numel() // max(1, c)
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and c > 1:
            flat = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view: rows are pixels, columns channels
            ones = x.new_ones(1, flat.shape[0])
            s1 = (ones @ flat)[0]
            s2 = (flat * flat).sum(0)
        else:
            spatial = x.reshape(x.shape[0], c, -1)
            s1 = spatial.sum(2).sum(0)
            s2 = (spatial * spatial).sum(2).sum(0)
        return s1 / count, s2 / count

    @staticmethod
    def backward(ctx: Any, g_mean: torch.Tensor | None, g_sq: torch.Tensor | None):
        (x,) = ctx.saved_tensors
        c = x.shape[1]
        count = x.numel() // max(1, c)
        shape = (1, c) + (1,) * (x.dim() - 2)
        g_mean = g_mean if g_mean is not None else x.new_zeros(c)
        g_sq = g_sq if g_sq is not None else x.new_zeros(c)
        return torch.addcmul((g_mean / count).view(shape), x, (2 * g_sq / count).view(shape))


def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean of squares of ``x`` (N, C, ...), differentiable, cheap backward."""
    return _ChannelMoments.apply(x)


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and (biased) variance, as BatchNorm computes them in training mode."""
    mean, sq = channel_moments(x)
    return mean, (sq - mean * mean).clamp_min(0)


# --- BatchNorm folding --------------------------------------------------------------------------------


class FoldedBatchNorm(nn.Module):
    """Stands where a BatchNorm was folded into the previous layer: the identity in the forward pass.

    It keeps that BN's running statistics and its per-channel scale ``s`` and shift ``t``, so the
    BN-statistics term can recover the BN input's batch statistics from the folded layer's output.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.num_features = bn.num_features
        self.register_buffer("running_mean", bn.running_mean.detach().clone(), persistent=False)
        self.register_buffer("running_var", bn.running_var.detach().clone(), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def input_moments(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mean and variance of the folded BN's input, from the folded layer's output ``y``."""
        mean_y, var_y = batch_moments(y)
        return (mean_y - self.shift) / self.scale, var_y / (self.scale * self.scale)

    def extra_repr(self) -> str:
        return f"{self.num_features}"


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _foldable(bn: nn.Module) -> bool:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_var)
    if not bool(torch.all(gamma != 0)):
        return False
    return bool((beta.abs() / gamma.abs()).max() <= FOLD_MAX_SHIFT_RATIO)


def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> FoldedBatchNorm:
    scale, shift = _bn_scale_shift(bn)
    weight = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    new_weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    new_bias = bias * scale + shift
    dtype = layer.weight.dtype
    with torch.no_grad():
        layer.weight.copy_(new_weight.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(dtype), requires_grad=False)
        else:
            layer.bias.copy_(new_bias.to(dtype))
    return FoldedBatchNorm(bn, scale.to(dtype), shift.to(dtype))


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(layer, bn)`` qualified names where a BN's only input is a conv/linear output used nowhere else.

    Found by FX-tracing the module; the module's own forward keeps running (only submodules are swapped).
    Falls back to adjacent children of ``nn.Sequential`` containers when tracing fails.
    """
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # untraceable forward: adjacent pairs in Sequentials only
        pairs = []
        for name, seq in module.named_modules():
            if isinstance(seq, nn.Sequential):
                kids = list(seq.named_children())
                for (a, first), (b, second) in itertools.pairwise(kids):
                    if isinstance(first, (nn.Conv2d, nn.Linear)) and isinstance(
                        second, nn.modules.batchnorm._BatchNorm
                    ):
                        prefix = f"{name}." if name else ""
                        pairs.append((prefix + a, prefix + b))
        return pairs
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), nn.modules.batchnorm._BatchNorm
        ):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), (nn.Conv2d, nn.Linear))
            and len(src.users) == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def fold_batchnorm(module: nn.Module) -> tuple[int, int]:
    """Fold, in place, every foldable BN of ``module`` into its conv/linear; returns (folded, kept)."""
    folded = kept = 0
    for layer_name, bn_name in _conv_bn_pairs(module):
        bn = module.get_submodule(bn_name)
        if not _foldable(bn):
            kept += 1
            continue
        _set_submodule(module, bn_name, _fold_into(module.get_submodule(layer_name), bn))
        folded += 1
    return folded, kept


def _pool_before_relu(module: nn.Module) -> None:
    """``ReLU → MaxPool2d`` becomes ``MaxPool2d → ReLU`` in every Sequential (max and ReLU commute)."""
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in itertools.pairwise(keys):
            first, second = seq._modules[a], seq._modules[b]
            if type(first) is nn.ReLU and type(second) is nn.MaxPool2d and not second.return_indices:
                seq._modules[a], seq._modules[b] = second, first


# --- small convolutions as GEMMs ------------------------------------------------------------------
#
# oneDNN runs convolutions with very few channels at a few GFLOP/s on CPU: the input gradient of a
# teacher's image conv (1 input channel) and the generator's image conv (1 output channel). Both become
# one GEMM over channels plus k² shifted slice adds (stride 1, groups 1, zero padding):
#
# * frozen thin-input conv: forward as usual; ``∂x = col2im(Wᵀ g)`` (GEMM, then k² shifted adds);
# * tap-sum (few output channels): ``P[a,b,o] = Σ_c W[o,c,a,b] x_c``, ``y_o = Σ_ab shift_ab(P[a,b,o])``;
#   its gradients are the adjoints (k² shifted copies, then GEMMs).
#
# Tap tensors are laid out (kh, kw, C, N, H, W), so every shift is one slice op over all channels.


def _tap_sum(
    p: torch.Tensor, pad: tuple[int, int], out_hw: tuple[int, int], flip: bool = False
) -> torch.Tensor:
    """``y[c,n,h,w] = Σ_ab p[a',b',c,n, h+a-pad_h, w+b-pad_w]`` (zero outside), ``(a',b') = (a,b)`` or the
    reversed taps when ``flip``; ``p`` is (kh, kw, C, N, Hin, Win), ``y`` is (C, N, Ho, Wo)."""
    kh, kw, c, n, hin, win = p.shape
    (ph, pw), (ho, wo) = pad, out_hw
    y = p.new_zeros(c, n, ho, wo)
    for a in range(kh):
        h0, h1 = max(0, ph - a), min(ho, hin + ph - a)
        for b in range(kw):
            w0, w1 = max(0, pw - b), min(wo, win + pw - b)
            if h1 > h0 and w1 > w0:
                ta, tb = (kh - 1 - a, kw - 1 - b) if flip else (a, b)
                y[:, :, h0:h1, w0:w1] += p[ta, tb, :, :, h0 + a - ph : h1 + a - ph, w0 + b - pw : w1 + b - pw]
    return y


def _tap_gather(
    g: torch.Tensor, k: tuple[int, int], pad: tuple[int, int], out_hw: tuple[int, int]
) -> torch.Tensor:
    """The adjoint of :func:`_tap_sum` (no flip): ``out[a,b,c,n,i,j] = g[c,n, i-a+pad_h, j-b+pad_w]``
    (zero outside); ``g`` is (C, N, Hg, Wg), ``out`` is (kh, kw, C, N, Ho, Wo)."""
    c, n, hg, wg = g.shape
    (kh, kw), (ph, pw), (ho, wo) = k, pad, out_hw
    out = g.new_zeros(kh, kw, c, n, ho, wo)
    for a in range(kh):
        h0, h1 = max(0, ph - a), min(hg, ho + ph - a)
        for b in range(kw):
            w0, w1 = max(0, pw - b), min(wg, wo + pw - b)
            if h1 > h0 and w1 > w0:
                out[a, b, :, :, h0 + a - ph : h1 + a - ph, w0 + b - pw : w1 + b - pw] = g[:, :, h0:h1, w0:w1]
    return out


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as a (N·H·W, C) matrix (a view for channels-last tensors)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as (C, N, H, W) (a view when C is 1)."""
    return x.transpose(0, 1) if x.shape[1] == 1 else x.transpose(0, 1).contiguous()


def _from_pixels(m: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """A (N·H·W, C) matrix as a channels-last (N, C, H, W) tensor (a view)."""
    return m.view(n, h, w, -1).permute(0, 3, 1, 2)


def _out_hw(x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]) -> tuple[int, int]:
    (ph, pw), (kh, kw) = padding, weight.shape[2:]
    return x.shape[2] + 2 * ph - kh + 1, x.shape[3] + 2 * pw - kw + 1


class _FrozenThinConv(torch.autograd.Function):
    """conv2d (stride 1, groups 1) with a frozen weight and few input channels; its input gradient
    (oneDNN's slowest case) is one GEMM plus k² shifted adds: ``∂x = col2im(Wᵀ g)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding):
        ctx.save_for_backward(weight)
        ctx.padding, ctx.in_hw = padding, tuple(x.shape[2:])
        return torch.nn.functional.conv2d(x, weight, bias, 1, padding)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        (weight,) = ctx.saved_tensors
        o, c, kh, kw = weight.shape
        n, _, ho, wo = g.shape
        wmat = weight.permute(0, 2, 3, 1).reshape(o, -1)  # columns (a, b, c)
        q = torch.mm(wmat.t(), _pixels(g).t()).view(kh, kw, c, n, ho, wo)
        ph, pw = ctx.padding
        grad_x = _tap_sum(q, (kh - 1 - ph, kw - 1 - pw), ctx.in_hw, flip=True).transpose(0, 1)
        if c > 1:
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        return grad_x, None, None, None


class _TapSumConv(torch.autograd.Function):
    """conv2d (stride 1, groups 1) for few output channels: a GEMM over channels, then k² shifted adds."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding):
        o, c, kh, kw = weight.shape
        n, _, h, w = x.shape
        ho, wo = _out_hw(x, weight, padding)
        wmat = weight.permute(2, 3, 0, 1).reshape(-1, c)  # rows (a, b, o)
        p = torch.mm(wmat, _pixels(x).t()).view(kh, kw, o, n, h, w)
        y = _tap_sum(p, padding, (ho, wo)).transpose(0, 1)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.bias = padding, bias is not None
        return y.contiguous(memory_format=torch.channels_last if o > 1 else torch.contiguous_format)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        o, c, kh, kw = weight.shape
        n, _, h, w = x.shape
        gp = _tap_gather(_channels_first(g), (kh, kw), ctx.padding, (h, w)).view(kh * kw * o, -1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            wmat = weight.permute(2, 3, 0, 1).reshape(-1, c)
            grad_x = _from_pixels(torch.mm(gp.t(), wmat), n, h, w)
            if not x.is_contiguous(memory_format=torch.channels_last):
                grad_x = grad_x.contiguous()
        if ctx.needs_input_grad[1]:
            grad_w = torch.mm(gp, _pixels(x)).view(kh, kw, o, c).permute(2, 3, 0, 1)
            grad_w = grad_w.contiguous(memory_format=_format_of(weight))
        if ctx.bias and ctx.needs_input_grad[2]:
            grad_b = g.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class FrozenThinConv2d(nn.Conv2d):
    """A frozen conv with few input channels (a teacher's image conv): the same forward, and a fast
    input gradient on CPU. Only for compute copies, whose weights never need gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _gemm_applies(x) or not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return _FrozenThinConv.apply(x, self.weight, self.bias, self.padding)


class TapSumConv2d(nn.Conv2d):
    """A conv with few output channels as GEMM + shifted adds on CPU (same results; oneDNN is slow
    there); the plain conv whenever it is traced for export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _gemm_applies(x):
            return super().forward(x)
        return _TapSumConv.apply(x, self.weight, self.bias, self.padding)


def _gemm_applies(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
    )


def _gemm_ok(conv: nn.Conv2d) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.groups == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and all(p < k for p, k in zip(conv.padding, conv.kernel_size))
    )


def _gemm_kernel(m: nn.Conv2d) -> bool:
    """Give a thin conv its GEMM kernel (only ``forward`` changes); returns whether it did. Frozen
    convs (compute copies) with few input channels get the fast input gradient, convs with few output
    channels the tap-sum kernel. (im2col for the weight gradient of a thin-input conv was slower than
    oneDNN's, so trainable thin-input convs stay as they are.)"""
    frozen = m.weight is not None and not isinstance(m.weight, nn.Parameter)
    if m.out_channels <= THIN_CHANNELS and m.out_channels < m.in_channels:
        m.__class__ = TapSumConv2d
    elif frozen and m.in_channels <= THIN_CHANNELS:
        m.__class__ = FrozenThinConv2d
    else:
        return False
    return True


def gemm_convs(module: nn.Module) -> int:
    """Give ``module``'s thin convolutions the GEMM kernels, in place (only ``forward`` changes: the
    parameters, their names and any optimiser's references stay the same); returns how many."""
    return sum(_gemm_kernel(m) for m in module.modules() if isinstance(m, nn.Conv2d) and _gemm_ok(m))


# --- compute copies ---------------------------------------------------------------------------------


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def copy_without_hooks(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that carries none of its hooks (e.g. other recorders' BN hooks)."""
    saved = []
    for m in module.modules():
        for attr in _HOOK_DICTS:
            if hasattr(m, attr):
                saved.append((m, attr, getattr(m, attr)))
                setattr(m, attr, type(getattr(m, attr))())
    try:
        return copy.deepcopy(module)
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


def _params_to_buffers(module: nn.Module) -> None:
    """Every parameter and buffer becomes a non-persistent buffer: no grads, no state_dict entries."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            del m._parameters[name]
            if p is not None:
                m.register_buffer(name, p.detach().requires_grad_(False), persistent=False)
            else:
                m.register_buffer(name, None, persistent=False)
        m._non_persistent_buffers_set.update(m._buffers)


def compute_copy(model: BlockClassifier, device: torch.device | None = None) -> BlockClassifier:
    """The fast copy of a frozen teacher: BN folded, pool before ReLU, thin image convs, channels-last.

    Its logits and block outputs equal the original's up to float rounding; the original is unchanged.
    """
    with torch.no_grad():
        fast = copy_without_hooks(model)
        fast.eval()
        folded = kept = 0
        for part in [*fast.blocks, fast.head]:
            f, k = fold_batchnorm(part)
            folded, kept = folded + f, kept + k
        _pool_before_relu(fast)
        for m in fast.modules():
            if hasattr(m, "inplace"):  # a folded BN passes its input on, which the stats term keeps
                m.inplace = False
        _params_to_buffers(fast)
        gemm_convs(fast)
        fmt = preferred_format(fast, device or next(fast.buffers()).device)
        for m in fast.modules():
            if isinstance(m, nn.Conv2d):
                m.weight = in_format(m.weight, fmt)
    if kept:
        log.info("compute copy keeps %d BatchNorm layer(s) unfolded (|beta/gamma| too large)", kept)
    fast.eval()
    return fast


class FrozenTeachers(nn.Module):
    """Base of the modules that hold frozen teachers (:class:`~dfka.amalgamation.teacher_set.TeacherSet`,
    :class:`ComputeTeachers`): :func:`accelerate` leaves them alone, their fast path is
    :func:`compute_copy`."""


class ComputeTeachers(FrozenTeachers):
    """The compute copies of a teacher set's models, by name; they never leave eval mode."""

    def __init__(self, models: dict[str, BlockClassifier]):
        super().__init__()
        self.models = nn.ModuleDict({name: compute_copy(m) for name, m in models.items()})

    def train(self, mode: bool = True) -> ComputeTeachers:
        super().train(mode)
        self.models.eval()
        return self


def preferred_format(module: nn.Module, device: torch.device) -> torch.memory_format:
    """Channels-last on CUDA, and on CPU for nets whose widest conv has at least
    :data:`CHANNELS_LAST_MIN_WIDTH` channels: oneDNN's channels-last kernels (and max-pool, BN) win there,
    while LeNet-5 students (6/16 channels, or 3/8 at half width) ran 10-25% faster in NCHW."""
    if device.type == "cuda":
        return torch.channels_last
    widths = [m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
    wide = bool(widths) and max(widths) >= CHANNELS_LAST_MIN_WIDTH
    return torch.channels_last if wide else torch.contiguous_format


def accelerate(module: nn.Module, device: torch.device, _fmt: torch.memory_format | None = None) -> nn.Module:
    """The fast path for a trainable module (generator, student, TargetNet), in place: GEMM kernels for
    its thin convs on CPU and conv weights in the preferred memory format (decided per net, see
    :func:`preferred_format`). Parameters stay the same objects under the same names, so optimisers,
    state dicts and checkpoints see no difference. Teacher sets inside ``module`` are left alone."""
    if isinstance(module, FrozenTeachers):
        return module
    if _fmt is None or isinstance(module, BlockClassifier):
        _fmt = preferred_format(module, device)
    if isinstance(module, nn.Conv2d):
        if device.type == "cpu" and _gemm_ok(module):
            _gemm_kernel(module)
        with torch.no_grad():
            module.weight.data = in_format(module.weight.data, _fmt)
    for child in module.children():
        accelerate(child, device, _fmt)
    return module


class PrefixCache:
    """Stage 2's frozen prefix, once per bank sample: while block ``b`` trains, student blocks
    ``1..b-1`` are frozen and in eval mode, so stream 1's input ``T^{b-1}∘…∘T^1(I_g)`` is a fixed
    function of the sample. It is computed the first time a sample comes up and looked up after that
    (call :meth:`reset` whenever the frozen blocks change). Batches without bank positions, or a cache
    that would exceed ``max_bytes``, fall back to computing the prefix every time.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        self.store: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None
        self.level = -1

    @torch.no_grad()
    def __call__(self, student: BlockClassifier, image: torch.Tensor, level: int, index: torch.Tensor | None):
        if index is None:
            return student.run_blocks(image, 0, level)
        if level != self.level:
            self.reset()
            self.level = level
        index = index.to(image.device)
        self._grow(int(index.max()) + 1, student, image, level)
        if self.store is None:  # too large to keep
            return student.run_blocks(image, 0, level)
        missing = ~self.filled[index]
        if bool(missing.any()):
            self.store[index[missing]] = student.run_blocks(image[missing], 0, level).to(self.store.dtype)
            self.filled[index[missing]] = True
        return self.store[index]

    def _grow(self, size: int, student: BlockClassifier, image: torch.Tensor, level: int) -> None:
        if self.store is not None and self.store.shape[0] >= size:
            return
        shape = student.level_shapes()[level]
        old = 0 if self.store is None else self.store.shape[0]
        new = max(size, 2 * old)
        if new * math.prod(shape) * image.element_size() > self.max_bytes:
            self.store = self.filled = None
            return
        store = image.new_empty(new, *shape)
        if len(shape) == 3:
            store = in_format(store, preferred_format(student, image.device))
        filled = torch.zeros(new, dtype=torch.bool, device=image.device)
        if self.store is not None:
            store[:old] = self.store
            filled[:old] = self.filled
        self.store, self.filled = store, filled
