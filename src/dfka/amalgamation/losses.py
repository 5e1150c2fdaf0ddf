"""Named loss terms of the amalgamating GAN (paper Eqs. 5-8, DAFL, DeepInversion) and the hooks they use.

Notation: ``z`` are a teacher's logits on a generated batch, ``p = softmax(z)`` (multi-class) or
``y = σ(z)`` (multi-label), bars are batch means, ``f`` the teacher's pre-head feature.

==========  ===========================================================  ====================================
term        multi-class teacher                                          multi-label teacher
==========  ===========================================================  ====================================
``oh``      :math:`\\mathrm{CE}(z, \\arg\\max z)`                          :math:`\\mathrm{BCE}(y, [y \\ge ε])`, ε=0.5
``ie``      :math:`\\sum_k \\bar p_k \\log \\bar p_k` (balance classes)      :math:`-\\frac1C\\sum_i H_b(\\bar y_i)`
``dis``     entropy of the teacher-ownership distribution (few owners)   :math:`\\frac1C \\sum_i |y_i|` (sparsity)
``a``       :math:`-\\operatorname{mean}|f|`                               same
``bn``      :math:`\\sum_\\ell \\|\\mu_\\ell - \\hat\\mu_\\ell\\|_2 + \\|\\sigma^2_\\ell - \\hat\\sigma^2_\\ell\\|_2` over every teacher BN layer
``tv``      :math:`\\operatorname{mean}|\\nabla_h x| + \\operatorname{mean}|\\nabla_w x|` (image prior)  same
==========  ===========================================================  ====================================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from dfka.engine import distributed as dist
from dfka.engine import fast

if TYPE_CHECKING:
    from dfka.amalgamation.teacher_set import TeacherSet

EPSILON = 0.5  # pseudo-label threshold ε of Eq. 5


def onehot_loss(z: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multiclass":
        return F.cross_entropy(z, z.argmax(1))
    y = torch.sigmoid(z)
    return F.binary_cross_entropy_with_logits(z, (y >= EPSILON).to(z.dtype))


def info_entropy_loss(z: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multiclass":
        p_bar = dist.batch_mean(F.softmax(z, 1))
        return (p_bar * torch.log(p_bar + 1e-8)).sum()
    y_bar = dist.batch_mean(torch.sigmoid(z)).clamp(1e-6, 1 - 1e-6)
    binary_entropy = -(y_bar * y_bar.log() + (1 - y_bar) * (1 - y_bar).log())
    return -binary_entropy.mean()


def sparsity_loss(z: torch.Tensor) -> torch.Tensor:
    """Multi-label L_dis (Eq. 7): real images carry few positive labels."""
    return torch.sigmoid(z).mean()


def ownership(logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """``(N, M)``: each teacher's claim on each sample, its share of the union softmax,
    :math:`q_m \\propto \\exp\\operatorname{logsumexp}(z_m)`."""
    energies = torch.stack([torch.logsumexp(z, 1) for z in logits], 1)
    return F.softmax(energies, 1)


def owner_weights(teachers: TeacherSet, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample weights of each multi-class teacher's routed BN term, ``M·q_m`` (mean 1 when a batch
    is shared evenly; detached). Multi-label teachers see every image, so they get none (uniform)."""
    claimants = [n for n in teachers.names if teachers.infos[n].task == "multiclass"]
    if len(claimants) < 2:
        return {}
    with torch.no_grad():
        q = ownership([teachers.select(n, logits[n]) for n in claimants])
    return {n: q[:, i] * len(claimants) for i, n in enumerate(claimants)}


def ownership_entropy(logits: Iterable[torch.Tensor]) -> torch.Tensor:
    """Multi-class L_dis: the entropy (in [0, 1], base M) of which teacher claims each sample
    (:func:`ownership`)."""
    q = ownership(logits)
    entropy = -(q * torch.log(q + 1e-8)).sum(1).mean()
    return entropy / math.log(max(2, q.shape[1]))


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Anisotropic L1 total variation, the image prior of DeepInversion (Yin et al. 2020):
    :math:`\\operatorname{mean}|x_{i+1,j}-x_{i,j}| + \\operatorname{mean}|x_{i,j+1}-x_{i,j}|`. Real images are
    piecewise smooth; without it the generator is free to use high-frequency patterns that the teachers
    score confidently and that no real image has."""
    dh = (image[:, :, 1:, :] - image[:, :, :-1, :]).abs().mean()
    dw = (image[:, :, :, 1:] - image[:, :, :, :-1]).abs().mean()
    return dh + dw


def activation_loss(features: Iterable[torch.Tensor]) -> torch.Tensor:
    feats = list(features)
    return -torch.stack([f.abs().mean() for f in feats]).mean()


class BNStatsRecorder:
    """Forward hooks on every BatchNorm layer of ``modules`` that measure how far a batch's statistics
    are from the running statistics (DeepInversion). Only records while :attr:`active`.

    Teachers' running statistics summarise their training data: matching them is standard for
    data-free methods, and the model card says so.
    """

    def __init__(
        self, modules: Iterable[nn.Module] | Mapping[str, nn.Module], path: fast.ComputePath = fast.FAST
    ):
        self.active = False
        self.terms: list[torch.Tensor] = []
        self._handles = []
        # fast path: one-pass backward for the moments; BNs folded into their conv (fast.compute_copy)
        # report their input's statistics from the folded output
        self._fast = path.fast
        named = modules.items() if isinstance(modules, Mapping) else ((None, m) for m in modules)
        for key, module in named:
            for m in module.modules():
                if isinstance(m, fast.FoldedBatchNorm) or (
                    isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                ):
                    self._handles.append(m.register_forward_hook(functools.partial(self._hook, key)))

    @property
    def num_layers(self) -> int:
        return len(self._handles)

    def _hook(
        self, _key: str | None, module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor
    ):
        if not self.active:
            return
        x = inputs[0]
        if isinstance(module, fast.FoldedBatchNorm):
            mean, var = module.input_moments(x)
        elif self._fast:
            mean, var = fast.batch_moments(x)
        else:
            # per-channel sums over H,W first, then over the batch: about 2x faster than var_mean over
            # (0, 2, 3) on CPU, forward and backward (E[x²] - E[x]² is fine at BN-input magnitudes)
            spatial = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)
            n = spatial.shape[0] * spatial.shape[2]
            mean = spatial.sum(2).sum(0) / n
            var = ((spatial * spatial).sum(2).sum(0) / n - mean * mean).clamp_min(0)
        mean, var = dist.moments(mean, var)  # over every rank's share of the batch
        self.terms.append(
            torch.linalg.vector_norm(mean - module.running_mean)
            + torch.linalg.vector_norm(var - module.running_var)
        )

    def pop(self) -> torch.Tensor:
        """Sum of the recorded terms since the last call, then reset."""
        total = torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        self.terms = []
        return total

    def term(self, teachers: TeacherSet, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This batch's BN term, once the teachers have scored it (``logits``); the batch term needs
        no scores."""
        return self.pop()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class RoutedBNStats(BNStatsRecorder):
    """BatchNorm-statistics matching routed by ownership: teacher ``m``'s BN layers are matched on the
    samples that teacher ``m`` claims, weighted by its claim :math:`q_m` (:func:`ownership`, detached).

    .. math::  L_{bn} = \\sum_m \\bar w_m \\sum_{\\ell \\in m} \\|\\mu^w_\\ell - \\hat\\mu_\\ell\\|_2
               + \\|\\sigma^{2,w}_\\ell - \\hat\\sigma^2_\\ell\\|_2,
               \\qquad w_{i,m} = M q_{i,m},\\quad \\mu^w = \\frac{\\sum_i w_{i,m}\\,\\mu_i}{\\sum_i w_{i,m}}

    where :math:`\\mu_i` are sample ``i``'s per-channel moments (over H, W). A teacher's running statistics
    describe *its* training images: a digit teacher's and a garment teacher's cannot both be matched by
    one mixed batch, but each can be matched by the samples it owns. With uniform weights (one teacher,
    or multi-label teachers that all see every image) this is the plain batch term.

    Hooks record per-sample moments; :meth:`pop` takes the weights, which only exist once the teachers
    have scored the batch.
    """

    def __init__(self, modules: Mapping[str, nn.Module], path: fast.ComputePath = fast.FAST):
        #: (teacher, BN module, per-sample mean (N, C), per-sample mean of squares (N, C)) per BN call
        self.records: list[tuple[str | None, nn.Module, torch.Tensor, torch.Tensor]] = []
        super().__init__(modules, path)

    def _hook(self, key: str | None, module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor):
        if not self.active:
            return
        x = inputs[0]
        spatial = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)
        self.records.append((key, module, spatial.mean(2), (spatial * spatial).mean(2)))

    def pop(self, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The routed term since the last call; ``weights[name]`` (N,) per teacher, missing = uniform."""
        total: torch.Tensor | None = None
        for key, module, m, q in self.records:
            w = (weights or {}).get(key)
            if w is None:
                share, mean, sq = 1.0, dist.batch_mean(m), dist.batch_mean(q)
            elif dist.world().size == 1:
                share = w.mean()
                norm = w / w.sum().clamp_min(1e-6)
                mean, sq = norm @ m, norm @ q
            else:  # the same weighted moments over every rank's share
                share = dist.batch_mean(w)
                mass = dist.global_sum(w.sum()).clamp_min(1e-6)
                mean, sq = dist.global_sum(w @ m) / mass, dist.global_sum(w @ q) / mass
            var = (sq - mean * mean).clamp_min(0)
            if isinstance(module, fast.FoldedBatchNorm):  # moments of the folded output y = s·x + t
                mean, var = (mean - module.shift) / module.scale, var / (module.scale * module.scale)
            term = share * (
                torch.linalg.vector_norm(mean - module.running_mean)
                + torch.linalg.vector_norm(var - module.running_var)
            )
            total = term if total is None else total + term
        self.records = []
        return total if total is not None else torch.zeros(())

    def term(self, teachers: TeacherSet, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This batch's routed term, each teacher's layers weighted by :func:`owner_weights`."""
        return self.pop(owner_weights(teachers, logits))


def bn_recorder(
    modules: Mapping[str, nn.Module], routing: str, path: fast.ComputePath = fast.FAST
) -> BNStatsRecorder:
    """BN-statistics matching over the teachers ``modules`` as ``gan.bn_routing`` says: ``owner`` (routed
    by ownership, :class:`RoutedBNStats`) or ``batch`` (the whole batch, :class:`BNStatsRecorder`)."""
    return (RoutedBNStats if routing == "owner" else BNStatsRecorder)(modules, path)


class InputRecorder:
    """Forward pre-hooks that keep the input of one submodule per key (e.g. each teacher's head)."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.values: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._make(k)) for k, m in modules.items()]

    def _make(self, key: str):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self.values[key] = inputs[0]

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
