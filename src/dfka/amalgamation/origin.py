"""Origin-labelled synthesis: every sample is generated *for* one teacher's label, and carries it.

A teacher trained on its own labels :math:`Y_m` gives :math:`p(y \\mid x, y \\in Y_m)`; nothing in its
output says whether ``x`` belongs to it at all, so the union of the teachers routes by uncalibrated
confidence. When each synthetic sample is made for a known *slot* ``s = (m, y)`` (teacher ``m``, one of
its labels ``y`` in Y_cst), the student can learn "which teacher" from where the sample came from.

The slot rides in the latent code, ``z = [ε ; onehot(s)]``, so samples, banks and exports keep their
format and the origin is recovered as ``argmax z[:, -S:]``. Slots are drawn with equal shares per
teacher and uniform labels within a teacher.

Generator side (stage 1), per sample of slot ``(m, y)``:

.. math::  L_{own} = \\mathrm{CE}\\big(g_m(T_m(\\tilde x)),\\ y\\big),\\qquad
           L_{div} = \\frac1P\\sum_{(i,j)\\ \\mathrm{same\\ slot}} \\max\\big(0,\\ \\delta - \\|x_i - x_j\\|_1 / D\\big)

with :math:`\\tilde x` the image after the same random shift for every teacher (so that no teacher's
samples carry an artefact of their own), and BatchNorm matching of teacher ``m`` on teacher ``m``'s
samples only.

Student side (fine-tune), with ``s`` the student's Y_cst scores and :math:`P_m` teacher ``m``'s positions:

.. math::  L_{ce} = \\mathrm{CE}(s, \\mathrm{pos}(y)),\\quad
           L_{own\\,kd} = \\tau^2\\,\\mathrm{KL}\\big(\\sigma(g_m(T_m)/\\tau)\\,\\|\\,\\sigma(s_{P_m}/\\tau)\\big),\\quad
           L_{which} = \\mathrm{CE}\\big([\\operatorname{lse}(s_{P_1}),\\dots,\\operatorname{lse}(s_{P_M})],\\ m\\big)

Where the teachers' union already routes the origin-known samples well (calibrated teachers), KD toward
the union is kept too; :func:`union_trust` measures that, data-free, on the bank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfka.amalgamation.teacher_set import TeacherSet
from dfka.engine import distributed as dist


@dataclass(frozen=True)
class OriginSlots:
    """The (teacher, label) slots a conditional generator is asked for, and their decoding tensors."""

    teachers: tuple[str, ...]  # the multi-class teachers, in teacher-set order
    teacher_of: torch.Tensor  # (S,) teacher index of each slot
    local_of: torch.Tensor  # (S,) index in that teacher's selected (Y_cst) outputs
    pos_of: torch.Tensor  # (S,) position of the slot's label in Y_cst
    groups: tuple[tuple[int, ...], ...]  # Y_cst positions of each teacher's labels

    @classmethod
    def of(cls, teachers: TeacherSet) -> OriginSlots | None:
        """The slots of a teacher set, or None when origin labels do not apply (a multi-label teacher:
        it sees every image, so a sample has no single origin)."""
        if any(teachers.infos[n].task != "multiclass" for n in teachers.names):
            return None
        t, local, pos = [], [], []
        for m, name in enumerate(teachers.names):
            for k, p in enumerate(teachers.infos[name].pos):
                t.append(m)
                local.append(k)
                pos.append(p)
        groups = tuple(tuple(teachers.infos[n].pos) for n in teachers.names)
        return cls(tuple(teachers.names), torch.tensor(t), torch.tensor(local), torch.tensor(pos), groups)

    @property
    def size(self) -> int:
        return len(self.teacher_of)

    def draw(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """``n`` slots: teachers in equal shares (a random rotation), labels uniform within a teacher."""
        m = len(self.teachers)
        start = int(torch.randint(m, (1,), generator=rng))
        teacher = (torch.arange(n) + start) % m
        counts = torch.bincount(self.teacher_of, minlength=m)
        offsets = torch.cumsum(counts, 0) - counts
        within = (torch.rand(n, generator=rng) * counts[teacher]).long()
        return offsets[teacher] + within

    def encode(self, noise: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return torch.cat([noise, F.one_hot(slots.to(noise.device), self.size).to(noise.dtype)], 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The slot of each latent code (the last ``S`` entries are its one-hot)."""
        return z[:, -self.size :].argmax(1).cpu()

    def teacher_weights(self, slots: torch.Tensor, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Routed-BN weights: teacher ``m`` is matched on its own samples (``M·1[origin = m]``), in the
        dtype and on the device of ``like``."""
        t = self.teacher_of[slots]
        m = len(self.teachers)
        return {name: (t == i).to(like.device, like.dtype) * m for i, name in enumerate(self.teachers)}


def shift(image: torch.Tensor, pixels: int, rng: torch.Generator) -> torch.Tensor:
    """Differentiable random integer translation by up to ``pixels`` (zero fill), one offset per sample."""
    if pixels <= 0:
        return image
    n, _, h, w = image.shape
    # every rank draws the global batch's offsets (same RNG) and takes its own rows
    total = dist.global_rows(n)
    d = torch.randint(-pixels, pixels + 1, (2, total), generator=rng)[:, dist.world().rows(total)]
    padded = F.pad(image, (pixels, pixels, pixels, pixels))
    rows = (torch.arange(h).unsqueeze(0) + pixels - d[0].unsqueeze(1)).to(image.device)  # (N, H)
    cols = (torch.arange(w).unsqueeze(0) + pixels - d[1].unsqueeze(1)).to(image.device)  # (N, W)
    c = image.shape[1]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pixels))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def cross_teacher_mix(
    image: torch.Tensor, slots_info: OriginSlots, slots: torch.Tensor, n: int, rng: torch.Generator
) -> torch.Tensor:
    """``n`` pixel mixes :math:`\\lambda x_i + (1-\\lambda) x_j`, :math:`\\lambda \\sim U(0, 1)`, of two
    samples of (mostly) different origin teachers: images between the teachers' samples, where the
    union's routing is what the student has to learn and the origin-labelled samples say nothing.

    With several ranks, ``image`` and ``slots`` are this rank's share: the pairs are drawn over the
    global batch and the rank returns its share of the ``n`` mixes."""
    if dist.world().size > 1:
        mixed = cross_teacher_mix_global(dist.gather(image), slots_info, dist.gather(slots), n, rng)
        return dist.local(mixed)
    return cross_teacher_mix_global(image, slots_info, slots, n, rng)


def cross_teacher_mix_global(
    image: torch.Tensor, slots_info: OriginSlots, slots: torch.Tensor, n: int, rng: torch.Generator
) -> torch.Tensor:
    b = len(slots)
    t = slots_info.teacher_of[slots]
    i = torch.randint(b, (n,), generator=rng)
    j = torch.randint(b, (n,), generator=rng)
    for _ in range(4):  # redraw partners of the same teacher (a batch holds every teacher)
        same = t[i] == t[j]
        if not same.any():
            break
        j[same] = torch.randint(b, (int(same.sum()),), generator=rng)
    lam = torch.rand(n, 1, 1, 1, generator=rng).to(image.device, image.dtype)
    i, j = i.to(image.device), j.to(image.device)
    return lam * image[i] + (1 - lam) * image[j]


def own_label_loss(
    teachers: TeacherSet, slots_info: OriginSlots, logits: Mapping[str, torch.Tensor], slots: torch.Tensor
) -> torch.Tensor:
    """Mean CE of each sample's own teacher toward its slot's label (the other teachers do not judge)."""
    device = next(iter(logits.values())).device
    t = slots_info.teacher_of[slots].to(device)
    local = slots_info.local_of[slots].to(device)
    total = logits[slots_info.teachers[0]].new_zeros(())
    for m, name in enumerate(slots_info.teachers):
        mine = t == m
        if mine.any():
            z = teachers.select(name, logits[name])[mine]
            total = total + F.cross_entropy(z.float(), local[mine], reduction="sum")
    return total / len(slots)


def routing_loss(scores: torch.Tensor, slots_info: OriginSlots, slots: torch.Tensor) -> torch.Tensor:
    """CE of "which teacher" read off Y_cst scores (log-sum-exp of each teacher's labels) toward the origin.

    On the teachers' union it asks for samples the other teachers do not claim; on the student's
    scores it teaches the origin."""
    t = slots_info.teacher_of[slots].to(scores.device)
    if len(slots_info.groups) < 2:
        return scores.new_zeros(())
    energies = torch.stack([torch.logsumexp(scores[:, list(g)], 1) for g in slots_info.groups], 1)
    return dist.cross_entropy(energies.float(), t)


def diversity_hinge(image: torch.Tensor, slots: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on the mean absolute pixel distance between consecutive samples of the same slot."""
    image, slots = dist.gather(image), dist.gather(slots.to(image.device))  # pairs span the ranks
    order = torch.argsort(slots.to(image.device), stable=True)
    s, x = slots.to(image.device)[order], image[order].flatten(1)
    same = s[1:] == s[:-1]
    if not same.any():
        return image.new_zeros(())
    gap = (x[1:][same] - x[:-1][same]).abs().mean(1)
    return F.relu(margin - gap).mean()


def student_origin_terms(
    scores: torch.Tensor,
    teachers: TeacherSet,
    slots_info: OriginSlots,
    logits: Mapping[str, torch.Tensor],
    slots: torch.Tensor,
    temperature: float,
    keep: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``{ce, own_kd, which}`` for student scores over Y_cst on origin-labelled samples; with ``keep``
    (bool per sample), CE and which-teacher count only the kept samples (own-teacher KD counts all)."""
    device = scores.device
    t = slots_info.teacher_of[slots].to(device)
    pos = slots_info.pos_of[slots].to(device)
    if keep is None:
        ce, which = dist.cross_entropy(scores, pos), routing_loss(scores, slots_info, slots)
    elif dist.any_rank(keep.any()):
        kept = keep.to(device)
        ce = dist.cross_entropy(scores[kept], pos[kept])
        which = routing_loss(scores[kept], slots_info, slots[kept.cpu()])
    else:
        ce = which = scores.sum() * 0.0
    kd = scores.new_zeros(())
    for m, name in enumerate(slots_info.teachers):
        mine = t == m
        if mine.any():
            own = teachers.select(name, logits[name])[mine] / temperature
            mine_scores = scores[mine][:, list(slots_info.groups[m])] / temperature
            log_t = F.log_softmax(own, 1)
            kl = (log_t.exp() * (log_t - F.log_softmax(mine_scores, 1))).sum()
            kd = kd + kl * temperature**2
    return {"ce": ce, "own_kd": dist.per_sample_total(kd, len(slots)), "which": which}


def fit_routing_bias(
    union_scores: torch.Tensor, slots_info: OriginSlots, slots: torch.Tensor, steps: int = 200
) -> torch.Tensor:
    r"""Per-teacher offsets ``b`` (mean 0) that make the union route origin-known samples best.

    Adding ``b_m`` to teacher ``m``'s logits adds it to the energy :math:`E_m = \operatorname{lse}(s_{P_m})`,
    so this is a logistic regression with intercepts only, convex:

    .. math::  b^\star = \arg\min_b\ \mathrm{CE}\big(E + b,\ m\big)

    One number per teacher: it corrects how loud a teacher is relative to the others (the ensemble's
    routing error on fashion is mostly that), without refitting what each teacher says within its labels.
    """
    t = slots_info.teacher_of[slots].to(union_scores.device)
    energies = torch.stack(
        [torch.logsumexp(union_scores[:, list(g)].float(), 1) for g in slots_info.groups], 1
    ).detach()
    bias = torch.zeros(energies.shape[1], device=energies.device, requires_grad=True)
    opt = torch.optim.LBFGS([bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(energies + bias, t) + 1e-4 * (bias * bias).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (bias - bias.mean()).detach()


@torch.no_grad()
def routed_to_origin(
    union_scores: torch.Tensor, slots_info: OriginSlots, slots: torch.Tensor
) -> torch.Tensor:
    """Per sample (bool, on the scores' device): does the union's top label belong to the origin teacher?"""
    top = union_scores.argmax(1)
    member = torch.zeros(len(slots_info.groups), union_scores.shape[1], dtype=torch.bool)
    for m, g in enumerate(slots_info.groups):
        member[m, list(g)] = True
    member = member.to(union_scores.device)
    return member[slots_info.teacher_of[slots].to(union_scores.device), top]


@torch.no_grad()
def union_trust(union_scores: torch.Tensor, slots_info: OriginSlots, slots: torch.Tensor) -> float:
    """How often the teachers' union puts a synthetic sample's top label in its origin teacher's labels.

    A data-free reading of how well the union routes: near 1 where the teachers reject each other's
    samples (calibrated), low where one teacher claims the other's (then only origin supervision helps).
    """
    return float(routed_to_origin(union_scores, slots_info, slots).float().mean())


@dataclass(frozen=True)
class LabelTargets:
    r"""Label-conditioned synthesis for multi-label teachers: every sample is generated for a known
    target label vector :math:`t \in \{0, 1\}^{|Y_{cst}|}`, carried in the latent code like a slot.

    A multi-label teacher sees every image (independent sigmoids), so a sample has no single origin;
    what it can have is a known label set. The target rides in ``z = [ε ; t]`` (banks and exports keep
    their format; ``t = z[:, -L:] > 0.5``). Each target has ``k ~ U{lo..hi}`` positives (clamped to
    ``[0, L]``), drawn uniformly over *all* labels of Y_cst: the student's task is over Y_cst, and
    uniform labels give every label the same share whatever teacher owns it, and mix the teachers'
    labels in one sample as the images the student will meet can (one teacher's labels only would never
    show it a sample that both teachers must judge).

    Stage 1: :math:`L_{oh} = \frac1N \sum_i \sum_m \sum_{y \in Y_m} \mathrm{BCE}(g_m(T_m(\tilde x_i))_y,\ t_{i,y})`
    (every teacher judges every sample on its own labels), beside the batch BN matching and a
    diversity hinge between samples of one target. Fine-tune: BCE of the student toward ``t`` and BCE
    toward the teachers' union (their sigmoids).
    """

    teachers: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]  # Y_cst positions of each teacher's labels
    size: int  # |Y_cst|
    positives: tuple[int, int]

    @classmethod
    def of(cls, teachers: TeacherSet, positives: tuple[int, int]) -> LabelTargets | None:
        """The target coder of a teacher set, or None unless every teacher is multi-label."""
        if any(teachers.infos[n].task != "multilabel" for n in teachers.names):
            return None
        groups = tuple(tuple(teachers.infos[n].pos) for n in teachers.names)
        return cls(tuple(teachers.names), groups, len(teachers.target_labels), tuple(positives))

    def draw(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """``n`` multi-hot targets (float, (n, L)): ``k ~ U{lo..hi}`` positives, uniform over Y_cst."""
        lo, hi = (max(0, min(self.size, v)) for v in self.positives)
        k = torch.randint(lo, hi + 1, (n, 1), generator=rng)
        rank = torch.rand(n, self.size, generator=rng).argsort(1).argsort(1)
        return (rank < k).float()

    def encode(self, noise: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.cat([noise, targets.to(noise.device, noise.dtype)], 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The target of each latent code (float 0/1, on the code's device)."""
        return (z[:, -self.size :].float() > 0.5).float()

    def keys(self, targets: torch.Tensor) -> torch.Tensor:
        """One integer per distinct target (for the diversity hinge between samples of one target)."""
        return torch.unique(targets, dim=0, return_inverse=True)[1]


def target_bce(
    teachers: TeacherSet,
    targets_info: LabelTargets,
    logits: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
) -> torch.Tensor:
    """Stage 1: every teacher's BCE toward its own part of the target, summed over labels, mean over samples."""
    targets = targets.to(next(iter(logits.values())).device)
    total = logits[targets_info.teachers[0]].new_zeros((), dtype=torch.float32)
    for m, name in enumerate(targets_info.teachers):
        z = teachers.select(name, logits[name]).float()
        t = targets[:, list(targets_info.groups[m])]
        total = total + F.binary_cross_entropy_with_logits(z, t, reduction="sum")
    return total / len(targets)


@torch.no_grad()
def agrees_with_target(union_scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample (bool): does the teachers' union (threshold 0 on its scores) give exactly the target?"""
    return ((union_scores > 0) == (targets.to(union_scores.device) > 0.5)).all(1)


#: whether ``gan.conditional: auto`` turns label-conditioned synthesis on for multi-label teacher sets
MULTILABEL_AUTO = False


def label_targets_of(
    teachers: TeacherSet, conditional: str, positives: tuple[int, int]
) -> LabelTargets | None:
    """The label-target coder ``gan.conditional`` asks for (``on``, or ``auto`` when
    :data:`MULTILABEL_AUTO`), or None (not every teacher multi-label, or conditioning off)."""
    if conditional == "on" or (conditional == "auto" and MULTILABEL_AUTO):
        return LabelTargets.of(teachers, positives)
    return None
