"""Stage 1: the amalgamating group-stack GAN (paper Eqs. 2-11).

The frozen teachers are the discriminators. Per step, for a latent batch ``z``:

1. ``F_g^1..F_g^B = G(z)``; the last is the image ``I_g``.
2. Every teacher scores the image; the union rule turns their logits into ``O_g(I_g)`` over Y_cst.
3. The image loss (Eq. 8 plus our extras), with named weights:

   .. math::  L_{gan} = L_{oh} + α L_a + β L_{ie} + γ L_{dis} + w_{bn} L_{bn} - w_{adv} L_{adv}

   For multi-class teachers the DAFL terms act on the union scores: the one-hot and balance terms then
   pick and balance classes across all teachers at once, instead of pushing every teacher to be
   confident on every image (which would breed images that no teacher really owns).
4. Consistency (Eq. 11): each intermediate feature ``F_g^j``, passed through teacher ``m``'s filter
   ``f_m^j`` and its last ``j`` blocks, must predict what the image predicts:

   .. math::  L_{cons} = \\frac{1}{B-1}\\sum_{j<B} \\ell\\big(O_g(F_g^j),\\ \\mathrm{sg}[O_g(I_g)]\\big)

   The image side is detached, so this term shapes the intermediate features and the per-group
   adversarial losses of groups ``1..B-1`` are not computed (the paper says the consistency offsets them).

Trainable: the generator groups and the filters ``f_m^j`` (``j<B``). Teachers never change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dfka.amalgamation.batch import SampleBatch
from dfka.amalgamation.config import GanConfig
from dfka.amalgamation.filters import TeacherFilter
from dfka.amalgamation.generator import GroupStackGenerator
from dfka.amalgamation.losses import (
    BNStatsRecorder,
    InputRecorder,
    RoutedBNStats,
    activation_loss,
    bn_recorder,
    info_entropy_loss,
    onehot_loss,
    ownership_entropy,
    sparsity_loss,
    total_variation,
)
from dfka.amalgamation.origin import (
    OriginSlots,
    diversity_hinge,
    label_targets_of,
    own_label_loss,
    routing_loss,
    shift,
    target_bce,
)
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.engine import distributed as dist
from dfka.engine.loop import cosine_lr, set_lr
from dfka.errors import ConfigError
from dfka.models import BlockClassifier


def group_widths(widths: int | list[int] | None, num_groups: int) -> list[int]:
    """Hidden width per group. Narrow by default (calibration: 32/32/16 beat 64/64/32 at equal time),
    and the image group at half width."""
    if widths is None:
        widths = 32
    if isinstance(widths, int):
        return [widths] * (num_groups - 1) + [max(4, widths // 2)]
    if len(widths) != num_groups:
        raise ConfigError(
            f"gan.widths lists {len(widths)} widths but the teachers have {num_groups} blocks",
            f"give {num_groups} widths, or one number for all groups",
        )
    return list(widths)


def generator_terms(
    teachers: TeacherSet, union: UnionRule, logits: dict[str, torch.Tensor], pre_head: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The DAFL terms of Eq. 8 on the union scores: ``({oh, ie, dis, a}, scores)``.

    Multi-class labels: one-hot and information entropy on the union softmax, and L_dis as the entropy
    of which teacher claims the sample; multi-label labels: their sigmoid versions and sparsity. The
    DAFL-style baseline uses the same function, so only the method differs between the two.
    """
    scores = union(logits)
    mc = union.multiclass_mask
    zero = scores.new_zeros(())
    oh = ie = dis = zero
    if mc.any():
        oh = oh + onehot_loss(scores[:, mc], "multiclass")
        ie = ie + info_entropy_loss(scores[:, mc], "multiclass")
        owners = [
            teachers.select(n, logits[n]) for n in teachers.names if teachers.infos[n].task == "multiclass"
        ]
        if len(owners) > 1:
            dis = dis + ownership_entropy(owners)
    if not mc.all():
        oh = oh + onehot_loss(scores[:, ~mc], "multilabel")
        ie = ie + info_entropy_loss(scores[:, ~mc], "multilabel")
        dis = dis + sparsity_loss(scores[:, ~mc])
    return {"oh": oh, "ie": ie, "dis": dis, "a": activation_loss(pre_head.values())}, scores


class AmalgamatingGAN(nn.Module):
    """Generator, teacher-level filters and the frozen teachers, with the stage-1 losses."""

    def __init__(
        self, teachers: TeacherSet, union: UnionRule, cfg: GanConfig, student: BlockClassifier | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.teachers = teachers
        self.union = union
        blocks = teachers.num_blocks
        levels = [teachers.input_shape] + [teachers.level_shape(level) for level in range(1, blocks)]
        self.levels = levels
        widths = group_widths(cfg.widths, blocks)
        #: origin-labelled synthesis (dfka.amalgamation.origin): the slot's one-hot rides in z
        self.origin = OriginSlots.of(teachers) if cfg.conditional in ("auto", "on") else None
        #: label-conditioned synthesis (multi-label teachers): the target label vector rides in z
        self.targets = label_targets_of(teachers, cfg.conditional, cfg.positives)
        conditions = self.origin.size if self.origin is not None else 0
        conditions += self.targets.size if self.targets is not None else 0
        self.generator = GroupStackGenerator(levels, cfg.latent_dim + conditions, widths)
        # filters[level][teacher] for the generated feature at teacher level 1..B-1 (f_m^B is the identity)
        self.filters = nn.ModuleDict()
        for level in range(1, blocks):
            spatial = len(levels[level]) == 3
            self.filters[str(level)] = nn.ModuleDict(
                {
                    name: TeacherFilter(levels[level][0], channels, spatial)
                    for name, channels in teachers.level_channels(level).items()
                }
            )
        # what runs: the teachers' compute copies on the fast path (fast.py), the teachers otherwise
        self.compute = teachers.compute_models()
        self.bn_stats: BNStatsRecorder | None = None
        if cfg.loss.bn > 0:
            self.bn_stats = bn_recorder(self.compute, cfg.bn_routing, teachers.path)
        self.pre_head = InputRecorder({name: model.head for name, model in self.compute.items()})
        # DFAD-style proxy student, only when the adversarial term is on.
        self.student = student if cfg.loss.adv > 0 else None

    def generator_level_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the generated levels ``0..B-1`` (image first), in the generator's widths."""
        return list(self.levels)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.generator.parameters(), *self.filters.parameters()]

    def sample_latent(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        """Latent codes: noise, plus (origin-labelled mode) the one-hot of a slot drawn in equal teacher
        shares, or (label-conditioned mode) a multi-hot target label vector."""
        noise = torch.randn(n, self.cfg.latent_dim, generator=rng)
        if self.origin is not None:
            noise = self.origin.encode(noise, self.origin.draw(n, rng))
        elif self.targets is not None:
            noise = self.targets.encode(noise, self.targets.draw(n, rng))
        return noise.to(device)

    def losses(
        self, z: torch.Tensor, aug_rng: torch.Generator | None = None
    ) -> tuple[dict[str, torch.Tensor], SampleBatch]:
        """Named loss parts (unweighted) for a latent batch, plus what was generated and scored.

        In origin-labelled mode (``aug_rng`` given) the image is shifted before the teachers see it, and
        the batch carries that image: what the teachers scored."""
        feats = self.generator(z)
        image = feats[-1]
        origin = self.origin
        if (origin is not None or self.targets is not None) and aug_rng is not None:
            image = shift(image, self.cfg.augment_shift, aug_rng)
        if self.bn_stats is not None:
            self.bn_stats.active = True
        logits = {name: model(image) for name, model in self.compute.items()}
        if self.bn_stats is not None:
            self.bn_stats.active = False
        pre_head = dict(self.pre_head.values)
        parts, scores = generator_terms(self.teachers, self.union, logits, pre_head)
        mc = self.union.multiclass_mask
        zero = scores.new_zeros(())
        if origin is not None:
            # each sample is judged by its own teacher only; balance and ownership come from the slots
            slots = origin.decode(z)
            parts = {"oh": own_label_loss(self.teachers, origin, logits, slots)}
            parts["div"] = diversity_hinge(feats[-1], slots, self.cfg.diversity_margin)
            parts["route"] = routing_loss(scores, origin, slots)
            if self.bn_stats is None:
                parts["bn"] = zero
            elif isinstance(self.bn_stats, RoutedBNStats):  # owner routing: by origin, not by claim
                parts["bn"] = self.bn_stats.pop(origin.teacher_weights(slots, image))
            else:
                parts["bn"] = self.bn_stats.term(self.teachers, logits)
        elif self.targets is not None:
            # every multi-label teacher judges every sample, on its own part of the target
            targets = self.targets.decode(z)
            parts = {"oh": target_bce(self.teachers, self.targets, logits, targets)}
            parts["div"] = diversity_hinge(feats[-1], self.targets.keys(targets), self.cfg.diversity_margin)
            parts["bn"] = self.bn_stats.term(self.teachers, logits) if self.bn_stats is not None else zero
        else:
            parts["bn"] = self.bn_stats.term(self.teachers, logits) if self.bn_stats is not None else zero

        blocks = self.teachers.num_blocks
        if blocks > 1 and self.cfg.loss.consistency > 0:  # at weight 0, skip the teachers' partial passes
            target = scores.detach()
            cons = []
            for j in range(1, blocks):
                level = self.generator.level_of_group(j)
                feat = feats[j - 1]
                level_logits = {
                    name: model.forward_from(self.filters[str(level)][name](feat), level)
                    for name, model in self.compute.items()
                }
                cons.append(union_loss(self.union(level_logits), target, mc))
            parts["consistency"] = torch.stack(cons).mean()
        else:
            parts["consistency"] = zero
        if self.student is not None:
            # generator seeks images where the proxy student disagrees with the teachers (DFAD)
            parts["adv"] = -(self.student(image) - scores).abs().mean()
        else:
            parts["adv"] = zero
        if self.cfg.loss.tv > 0:
            parts["tv"] = total_variation(image)
        levels = {self.generator.level_of_group(j): feats[j - 1] for j in range(1, blocks)}
        return parts, SampleBatch(z, image, levels, logits)

    def weighted(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cfg.loss.weighted(parts)


class GanTrainer:
    """Owns the optimiser and the latent RNG; ``step`` follows the engine's step contract."""

    def __init__(self, gan: AmalgamatingGAN, seed: int, device: torch.device):
        self.gan = gan.to(device)
        # several ranks: the generator (and proxy student) normalise with the global batch's moments
        dist.sync_batchnorm(gan.generator)
        if gan.student is not None:
            dist.sync_batchnorm(gan.student)
        self.path = gan.teachers.path
        self.path.accelerate(gan.generator, device)
        self.device = device
        self.cfg = gan.cfg
        adam = self.path.adam_options(device)
        self.optimizer = torch.optim.Adam(
            gan.trainable_parameters(), lr=self.cfg.lr, betas=(0.5, 0.999), **adam
        )
        self.student_optimizer = (
            torch.optim.Adam(gan.student.parameters(), lr=self.cfg.lr, **adam)
            if gan.student is not None
            else None
        )
        self.rng = torch.Generator().manual_seed(seed)
        #: called with every step's generated batch (already scored by the teachers), e.g. to bank it
        self.collector: Callable[[int, int, SampleBatch], None] | None = None

    def step(self, step: int, total: int) -> dict[str, torch.Tensor]:
        self.gan.train()
        lr = cosine_lr(self.cfg.lr, step, total)
        set_lr(self.optimizer, lr)
        # every rank draws the global batch's codes and generates its own rows of it
        z = dist.local(self.gan.sample_latent(self.cfg.batch_size, self.rng, self.device))
        with self.path.autocast(self.device):
            parts, generated = self.gan.losses(z, self.rng)
            loss = self.gan.weighted(parts)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.gan.trainable_parameters())
        self.optimizer.step()
        out = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
        if self.student_optimizer is not None:
            out["student_kd"] = self._student_steps(generated)
        if self.collector is not None:
            self.collector(step, total, generated.detached().gathered())
        return out

    def _student_steps(self, generated: SampleBatch) -> torch.Tensor:
        student = self.gan.student
        image = generated.image.detach()
        with torch.no_grad():  # the teachers already scored this batch: reuse their logits
            target = self.gan.union({k: v.detach() for k, v in generated.logits.items()})
        for _ in range(self.cfg.adv_student_steps):
            kd = union_loss(student(image), target, self.gan.union.multiclass_mask)
            self.student_optimizer.zero_grad(set_to_none=True)
            kd.backward()
            dist.average_gradients(student.parameters())
            self.student_optimizer.step()
        return kd.detach()

    def state_dict(self) -> dict:
        """Everything a resumed run needs: trainable modules, optimiser, latent RNG (not the teachers)."""
        state = {
            "generator": self.gan.generator.state_dict(),
            "filters": self.gan.filters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.get_state(),
        }
        if self.student_optimizer is not None:
            state["student"] = self.gan.student.state_dict()
            state["student_optimizer"] = self.student_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.gan.generator.load_state_dict(state["generator"])
        self.gan.filters.load_state_dict(state["filters"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.set_state(state["rng"])
        if self.student_optimizer is not None:
            self.gan.student.load_state_dict(state["student"])
            self.student_optimizer.load_state_dict(state["student_optimizer"])
