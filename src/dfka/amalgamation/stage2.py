"""Stage 2: block-wise training of the dual generator 𝒯, the future TargetNet (paper Eqs. 12-16).

Student block ``b`` is trained while the generator, student blocks ``1..b-1`` and the teachers are
frozen. Its discriminator for teacher ``m`` is that teacher's blocks ``b+1..B`` behind the filter
``f_m^b``; the task-level filter ``g_m`` keeps the outputs in Y_cst, and the union rule merges them:

.. math::  O(F_u^b) = \\mathrm{union}_m\\, g_m\\big(A_m^{B}\\circ\\dots\\circ A_m^{b+1}(f_m^b(F_u^b))\\big),
           \\qquad L_d^b(X) = \\ell\\big(O(\\mathcal T^b(X)),\\ O_{teachers}(I_g)\\big)

``ℓ`` is KL over the multi-class labels and BCE over the multi-label ones. Because the union merges the
teachers before the loss, the per-teacher weights λ_m of Eq. 14 become per-sample weights: a sample
counts with the (owner-averaged) λ of its top-scoring target label. Two input streams (Eqs. 15-16):

.. math::  L_u^b = λ^1 L_d^b\\big(\\mathcal T^{b-1}\\circ\\dots\\circ\\mathcal T^1(I_g)\\big) + λ^2 L_d^b\\big(h^b(F_g^{b-1})\\big)

where ``h^b`` is a 1x1 adaptor from the generator's width to the student's (identity when equal). At
``b = 1`` both streams are the image, so ``L_u^1 = (λ^1+λ^2) L_d^1(I_g)``. At ``b = B`` the
discriminator is empty: per-teacher branches (gate + linear head, the paper's ``f_m^B``) give the scores.

Trainable at block ``b``: ``𝒯^b``, ``f_m^b`` (``b<B``), ``h^b`` (``b>1``), and the branches at ``b=B``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from dfka.amalgamation.batch import SampleBatch
from dfka.amalgamation.config import BlocksConfig
from dfka.amalgamation.filters import ChannelGate, TeacherFilter, projection
from dfka.amalgamation.teacher_set import TeacherSet, check_student
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.engine import distributed as dist
from dfka.engine import fast
from dfka.engine.loop import cosine_lr, set_lr
from dfka.models import BlockClassifier, frozen_bn_stats


class Branch(nn.Module):
    """Teacher ``m``'s branch of the TargetNet: a channel gate and a linear head over its Y_cst labels."""

    def __init__(self, features: int, outputs: int):
        super().__init__()
        self.gate = ChannelGate(features)
        self.head = nn.Linear(features, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(x.flatten(1)))


class DualGenerator(nn.Module):
    """The student trunk, its per-teacher branches, and the training-only filters and adaptors."""

    def __init__(self, student: BlockClassifier, teachers: TeacherSet, generator_channels: dict[int, int]):
        super().__init__()
        check_student(student, teachers)
        self.student = student
        self.teachers = teachers
        self.num_blocks = student.num_blocks
        shapes = student.level_shapes()
        feat = int(torch.tensor(shapes[-1]).prod())
        self.branches = nn.ModuleDict(
            {name: Branch(feat, len(info.sel)) for name, info in teachers.infos.items()}
        )
        self.filters = nn.ModuleDict()
        for b in range(1, self.num_blocks):
            spatial = len(shapes[b]) == 3
            self.filters[str(b)] = nn.ModuleDict(
                {
                    name: TeacherFilter(shapes[b][0], c, spatial)
                    for name, c in teachers.level_channels(b).items()
                }
            )
        # h^b adapts the generator's feature at level b-1 to the student's width there (b >= 2)
        self.stream2 = nn.ModuleDict(
            {
                str(b): projection(generator_channels[b - 1], shapes[b - 1][0], len(shapes[b - 1]) == 3)
                for b in range(2, self.num_blocks + 1)
            }
        )
        owners = teachers.owners.clone()
        self.register_buffer("owners", owners, persistent=False)

    def branch_scores(self, feature: torch.Tensor) -> torch.Tensor:
        """Y_cst scores from the pre-head feature: branch logits placed by label, shared labels averaged."""
        acc = feature.new_zeros(feature.shape[0], len(self.owners))
        for name, branch in self.branches.items():
            pos = torch.tensor(self.teachers.infos[name].pos, device=feature.device)
            acc = acc.index_add(1, pos, branch(feature))
        return acc / self.owners

    def block_parameters(self, b: int) -> list[nn.Parameter]:
        params = list(self.student.blocks[b - 1].parameters())
        if b < self.num_blocks:
            params += list(self.filters[str(b)].parameters())
        else:
            params += list(self.branches.parameters())
        if b > 1:
            params += list(self.stream2[str(b)].parameters())
        return params


class BlockTrainer:
    """Trains the dual generator block by block on sample batches; ``step`` follows the engine contract."""

    def __init__(
        self,
        dual: DualGenerator,
        union: UnionRule,
        cfg: BlocksConfig,
        batches: Iterator[SampleBatch],
        device: torch.device,
    ):
        self.path = dual.teachers.path
        self.dual = self.path.accelerate(dist.sync_batchnorm(dual.to(device)), device)
        self.compute = dual.teachers.compute_models()  # teachers' compute copies on the fast path
        self.prefix = fast.PrefixCache() if self.path.fast else None  # frozen blocks 1..b-1 per sample
        self.union = union
        self.cfg = cfg
        self.batches = batches
        self.device = device
        self.block = 0
        self.optimizer: torch.optim.Optimizer | None = None
        names = dual.teachers.names
        lam = torch.tensor([cfg.lambda_teachers.get(n, 1.0) for n in names], device=device)
        # per-label λ: the mean λ_m over the label's owners
        label_lambda = torch.zeros(len(dual.owners), device=device)
        for i, name in enumerate(names):
            label_lambda[list(dual.teachers.infos[name].pos)] += lam[i]
        self.label_lambda = label_lambda / dual.owners.to(device)
        self.uniform_lambda = bool((lam == 1).all())

    def start_block(self, b: int) -> None:
        """Freeze everything except block ``b``'s trainable set and build its optimiser."""
        self.block = b
        if self.prefix is not None:
            self.prefix.reset()
        self.dual.requires_grad_(False)
        for p in self.dual.block_parameters(b):
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(
            self.dual.block_parameters(b), lr=self.cfg.lr, **self.path.adam_options(self.device)
        )
        self._train_modes()

    def _train_modes(self) -> None:
        """Only block ``b`` and its helpers in training mode: frozen blocks' BN statistics stay put."""
        self.dual.eval()
        b = self.block
        self.dual.student.blocks[b - 1].train()
        (self.dual.filters[str(b)] if b < self.dual.num_blocks else self.dual.branches).train()

    def scores_from(self, feature: torch.Tensor, b: int) -> torch.Tensor:
        """O(F_u^b): union scores for a student feature at level ``b``."""
        if b == self.dual.num_blocks:
            return self.dual.branch_scores(feature)
        logits = {
            name: model.forward_from(self.dual.filters[str(b)][name](feature), b)
            for name, model in self.compute.items()
        }
        return self.union(logits)

    def block_loss(self, batch: SampleBatch) -> dict[str, torch.Tensor]:
        b = self.block
        student = self.dual.student
        with torch.no_grad():
            target = self.union(batch.logits)
            if b == 1:
                own = batch.image
            elif self.prefix is not None:
                own = self.prefix(student, batch.image, b - 1, batch.index)
            else:
                own = student.run_blocks(batch.image, 0, b - 1)
        weights = self._sample_weights(target)
        mask = self.union.multiclass_mask
        feature1 = student.run_blocks(own, b - 1, b)
        if b == 1 or self.cfg.lambda_stream2 == 0:
            stream1 = self._loss(self.scores_from(feature1, b), target, mask, weights)
            stream2 = stream1 if b == 1 else torch.zeros_like(stream1)
        else:
            adapted = self.dual.stream2[str(b)](batch.features[b - 1])
            # Stream 2 shapes the block but must not shift its BN running statistics: at inference the
            # block only ever sees stream 1 (the student's own path).
            with frozen_bn_stats(student.blocks[b - 1]):
                feature2 = student.run_blocks(adapted, b - 1, b)
            if self.path.fast:  # filters and teachers act per sample: both streams in one batch
                scores1, scores2 = self.scores_from(torch.cat([feature1, feature2]), b).chunk(2)
            else:
                scores1, scores2 = self.scores_from(feature1, b), self.scores_from(feature2, b)
            stream1 = self._loss(scores1, target, mask, weights)
            stream2 = self._loss(scores2, target, mask, weights)
        loss = self.cfg.lambda_stream1 * stream1 + self.cfg.lambda_stream2 * stream2
        return {"loss": loss, "stream1": stream1.detach(), "stream2": stream2.detach()}

    def _sample_weights(self, target: torch.Tensor) -> torch.Tensor | None:
        if self.uniform_lambda:
            return None
        return self.label_lambda[target.argmax(1)]

    def _loss(
        self, scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None
    ) -> torch.Tensor:
        return union_loss(scores, target, mask, self.cfg.temperature, weights)

    def step(self, step: int, total: int) -> dict[str, torch.Tensor]:
        assert self.optimizer is not None, "call start_block first"
        self._train_modes()
        set_lr(self.optimizer, cosine_lr(self.cfg.lr, step, total))
        with self.path.autocast(self.device):
            out = self.block_loss(next(self.batches))
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        dist.average_gradients(self.dual.block_parameters(self.block))
        self.optimizer.step()
        return {k: v.detach() for k, v in out.items()}

    def state_dict(self) -> dict:
        return {
            "block": self.block,
            "dual": {k: v for k, v in self.dual.state_dict().items() if not k.startswith("teachers.")},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.dual.load_state_dict(state["dual"], strict=False)
        if state["block"]:
            self.start_block(state["block"])
            if state["optimizer"] is not None:
                self.optimizer.load_state_dict(state["optimizer"])
