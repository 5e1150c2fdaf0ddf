"""Layer-wise knowledge amalgamation (Shen et al., AAAI 2019), the with-data amalgamation baseline.

``../shared/method/dfka-spec.md`` §3, on real *unlabeled* training images (labels are never read):

1. **Feature amalgamation.** At every level ``l = 1..B`` the teachers' features are concatenated along
   channels, :math:`F^l = [F^l_1; \\dots; F^l_M]`, and an auto-encoder compresses them to the student's
   width: :math:`F^l_a = E^l(F^l)`, :math:`\\min \\|D^l(E^l(F^l)) - F^l\\|_2^2`.
2. **Layer-wise parameter learning.** Part-net ``l`` maps the previous compact feature to the current
   one, all parts in parallel on each batch (inputs and targets come from the frozen teachers and
   encoders): :math:`\\min \\|A^l_s(Q^{l-1} F^{l-1}_a) - F^l_a\\|_2^2` with :math:`F^0_a = x`, and for the
   head :math:`\\min \\|h_s(Q^B F^B_a) - \\operatorname{union}(T(x))\\|_2^2`. The aux layers ``Q`` are
   then folded into the student's weights, so the deployed student is the plain architecture.
3. **Joint fine-tune** (optional, ``split.finetune > 0``): the folded student end to end, MSE to the
   union scores (``finetune_loss: kd`` uses the shared union loss instead).

Adaptation to dfka's block models (deviations from the paper and its code):

* The unit is a **block**, not a layer: features are block outputs (levels ``1..B`` of
  :meth:`~dfka.models.BlockClassifier.run_blocks`), i.e. after the block's activation and pooling, where
  the authors' code hooks pre-activation conv outputs.
* Hence the encoder ends in a ReLU, so a compact feature lives in the space a student block outputs
  (non-negative); the decoder is linear.
* The aux layer :math:`Q^l` (a bias-free 1×1 conv or linear map, identity-initialised) sits at the input
  of part-net ``l+1`` and is folded into the **next** block's first linear map (:math:`W' = W Q`, exact even
  with zero padding because ``Q`` has no bias). The paper folds it into the preceding layer, which here
  is followed by BatchNorm, ReLU and pooling inside the block. A level whose next block has no foldable
  input (a ResNet stage whose first shortcut is the identity) gets no aux layer.
* The last-layer target is the union score vector every dfka method learns; for disjoint multi-class
  teachers under the default ``logits`` rule it is exactly the paper's concatenated teacher logits.
* Adam with one learning rate per step (not SGD with per-layer rates), and a step or wall-clock budget
  split over the three steps by ``split`` instead of 30/100/300 epochs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.run import MetricsCallback, StageReport, build_student
from dfka.amalgamation.teacher_set import TeacherSet, check_student
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.baselines.ensemble import union_targets
from dfka.baselines.kd_real import image_batches
from dfka.engine.loop import cosine_lr, run_loop, set_lr
from dfka.errors import CompatibilityError
from dfka.models import BlockClassifier
from dfka.models.resnet import BasicBlock
from dfka.runtime import seed_everything

STAGES = ("ae", "layerwise", "finetune")
PREFIX = {"ae": "layerwise.ae", "layerwise": "layerwise.parts", "finetune": "layerwise.finetune"}


class LayerwiseConfig(BaseModel):
    """Options of the layer-wise amalgamation baseline."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    batch_size: int = Field(64, ge=2)
    ae_lr: float = Field(2e-3, gt=0)
    layer_lr: float = Field(2e-3, gt=0)
    finetune_lr: float = Field(5e-4, gt=0)
    split: dict[str, float] = Field(
        default_factory=lambda: {"ae": 0.2, "layerwise": 0.5, "finetune": 0.3},
        description="share of the budget per step; finetune 0 is the strict two-step variant",
    )
    finetune_loss: Literal["mse", "kd"] = "mse"
    aux: bool = Field(True, description="train aux layers and fold them (False: plain part-nets)")

    @field_validator("split")
    @classmethod
    def _split(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown step(s) {sorted(unknown)}; use {list(STAGES)}")
        if any(x < 0 for x in v.values()) or v.get("ae", 0) <= 0 or v.get("layerwise", 0) <= 0:
            raise ValueError("split needs ae > 0 and layerwise > 0 (finetune may be 0)")
        return v


# --- modules -------------------------------------------------------------------------------------


class FeatureAE(nn.Module):
    """E^l and D^l: 1×1 convs (spatial levels) or linear maps (vector levels); the code is ReLU'd."""

    def __init__(self, channels: int, code: int, spatial: bool):
        super().__init__()
        layer = (lambda i, o: nn.Conv2d(i, o, 1)) if spatial else nn.Linear
        self.encoder = layer(channels, code)
        self.decoder = layer(code, channels)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.encoder(features))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encode(features)
        return code, self.decoder(code)


def aux_layer(shape: tuple[int, ...]) -> nn.Module:
    """Q^l: a bias-free channel mix (1×1 conv or linear), initialised to the identity."""
    c = shape[0]
    layer = nn.Conv2d(c, c, 1, bias=False) if len(shape) == 3 else nn.Linear(c, c, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(c).view_as(layer.weight))
    return layer


def input_consumers(module: nn.Module) -> list[tuple[nn.Module, str]] | None:
    """The linear maps that read ``module``'s input directly, or ``None`` if an aux layer cannot fold in.

    Kinds: ``conv`` (Conv2d), ``linear`` (Linear on a vector), ``flat`` (Flatten then Linear).
    """
    if isinstance(module, nn.Conv2d):
        return [(module, "conv")] if module.groups == 1 else None
    if isinstance(module, nn.Linear):
        return [(module, "linear")]
    if isinstance(module, nn.Sequential) and len(module) > 0:
        if isinstance(module[0], nn.Flatten):
            return [(module[1], "flat")] if len(module) > 1 and isinstance(module[1], nn.Linear) else None
        return input_consumers(module[0])
    if isinstance(module, BasicBlock):
        if isinstance(module.shortcut, nn.Identity):
            return None  # x + f(x): a channel mix on x cannot fold into an identity shortcut
        first, short = input_consumers(module.conv1), input_consumers(module.shortcut)
        return first + short if first and short else None
    return None


@torch.no_grad()
def fold_channel_mix(consumers: list[tuple[nn.Module, str]], q: torch.Tensor) -> None:
    """Replace each consumer ``W`` by ``W Q`` along its input channels (``q``: (C, C), y = Q x)."""
    c = q.shape[0]
    for layer, kind in consumers:
        w = layer.weight
        if kind == "conv":
            new = torch.einsum("ojhw,ji->oihw", w, q)
        elif kind == "linear":
            new = w @ q
        else:
            out = w.shape[0]
            new = torch.einsum("ojk,ji->oik", w.reshape(out, c, -1), q).reshape(out, -1)
        w.copy_(new)


class LayerwiseAmalgamator(nn.Module):
    """The student, the per-level auto-encoders and the aux layers, with the three steps' losses."""

    def __init__(self, student: BlockClassifier, teachers: TeacherSet, aux: bool = True):
        super().__init__()
        check_student(student, teachers)
        self.student = student
        self.teachers = teachers
        self.num_blocks = student.num_blocks
        shapes = student.level_shapes()
        self.aes = nn.ModuleDict()
        self.aux = nn.ModuleDict()
        for level in range(1, self.num_blocks + 1):
            t_shapes = [m.level_shapes()[level] for m in teachers.models.values()]
            if any(s[1:] != shapes[level][1:] for s in t_shapes):
                raise CompatibilityError(
                    f"level {level}: teachers give {t_shapes}, the student {shapes[level]}; layer-wise "
                    "amalgamation concatenates features, so their spatial shapes must agree",
                    "use teachers and a student with the same block split",
                )
            channels = sum(s[0] for s in t_shapes)
            self.aes[str(level)] = FeatureAE(channels, shapes[level][0], spatial=len(shapes[level]) == 3)
            consumer = student.blocks[level] if level < self.num_blocks else student.head
            if aux and input_consumers(consumer) is not None:
                self.aux[str(level)] = aux_layer(shapes[level])

    def train(self, mode: bool = True) -> LayerwiseAmalgamator:
        super().train(mode)
        self.teachers.eval()
        return self

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor]]:
        """Concatenated teacher features per level ``1..B``, and each teacher's logits."""
        per_level: dict[int, list[torch.Tensor]] = {b: [] for b in range(1, self.num_blocks + 1)}
        logits = {}
        for name, model in self.teachers:
            h = x
            for b in range(self.num_blocks):
                h = model.run_blocks(h, b, b + 1)
                per_level[b + 1].append(h)
            logits[name] = model.head(h)
        return {b: torch.cat(f, 1) for b, f in per_level.items()}, logits

    def _mix(self, level: int, h: torch.Tensor) -> torch.Tensor:
        return self.aux[str(level)](h) if str(level) in self.aux else h

    def ae_losses(self, features: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Step 1: reconstruction MSE per level."""
        return {f"ae{b}": F.mse_loss(self.aes[str(b)](f)[1], f) for b, f in features.items()}

    def part_losses(
        self, x: torch.Tensor, codes: Mapping[int, torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Step 2: every part-net against its compact target, from the previous compact feature."""
        parts = {}
        for b in range(1, self.num_blocks + 1):
            h = x if b == 1 else self._mix(b - 1, codes[b - 1])
            parts[f"block{b}"] = F.mse_loss(self.student.run_blocks(h, b - 1, b), codes[b])
        head = self.student.head(self._mix(self.num_blocks, codes[self.num_blocks]))
        parts["head"] = F.mse_loss(head, target)
        return parts

    def unfolded(self, x: torch.Tensor) -> torch.Tensor:
        """The stacked part-nets with their aux layers between blocks (what folding must reproduce)."""
        h = x
        for b in range(1, self.num_blocks + 1):
            h = self._mix(b, self.student.run_blocks(h, b - 1, b))
        return self.student.head(h)

    def folded(self) -> BlockClassifier:
        """A copy of the student with every aux layer folded into the next block (or the head)."""
        student = copy.deepcopy(self.student)
        for key, layer in self.aux.items():
            level = int(key)
            consumer = student.blocks[level] if level < self.num_blocks else student.head
            consumers = input_consumers(consumer)
            assert consumers is not None
            fold_channel_mix(consumers, layer.weight.detach().reshape(layer.weight.shape[0], -1))
        return student


# --- training ------------------------------------------------------------------------------------


def split_budget(budget: Budget, shares: Mapping[str, float]) -> dict[str, Budget]:
    """The total budget shared out over the steps with a positive share, in step order."""
    total = sum(shares.values())
    out = {}
    for name in STAGES:
        share = shares.get(name, 0.0)
        if share <= 0:
            continue
        if budget.steps is not None:
            out[name] = Budget(steps=max(1, round(budget.steps * share / total)))
        else:
            out[name] = Budget(seconds=budget.seconds * share / total)
    return out


def train_layerwise(
    teachers: TeacherSet,
    union: UnionRule,
    cfg: AmalgamationConfig,
    budget: Budget,
    images: torch.Tensor,
    *,
    options: LayerwiseConfig | None = None,
    device: torch.device,
    on_metrics: MetricsCallback | None = None,
    progress: bool = True,
) -> tuple[BlockClassifier, dict[str, StageReport]]:
    """Steps 1-3 on real unlabeled ``images``; returns the folded student and a report per step."""
    options = options or LayerwiseConfig()
    seed_everything(cfg.seed)
    student = build_student(cfg.student, teachers).to(device)
    amal = LayerwiseAmalgamator(student, teachers, aux=options.aux).to(device)
    budgets = split_budget(budget, options.split)
    batches = image_batches(images, options.batch_size, torch.Generator().manual_seed(cfg.seed), device)
    bs = options.batch_size
    stages: dict[str, StageReport] = {}
    offset = 0

    def loop(name: str, step_fn, desc: str, model: nn.Module | None = None) -> None:
        nonlocal offset
        result = run_loop(
            step_fn,
            budgets[name],
            desc=desc,
            prefix=PREFIX[name],
            on_metrics=on_metrics,
            progress=progress,
            step_offset=offset,
            model=model,
        )
        offset += result.steps
        stages[name] = StageReport(result.seconds, result.steps, result.steps * bs, dict(result.metrics))

    # Step 1: auto-encoders on the concatenated teacher features
    opt = torch.optim.Adam(amal.aes.parameters(), lr=options.ae_lr)

    def ae_step(i: int, total: int) -> dict[str, torch.Tensor]:
        amal.train()
        set_lr(opt, cosine_lr(options.ae_lr, i, total))
        features, _ = amal.teacher_features(next(batches))
        parts = amal.ae_losses(features)
        loss = torch.stack(list(parts.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    loop("ae", ae_step, "layer-wise: auto-encoders")
    amal.aes.requires_grad_(False)

    # Step 2: every part-net in parallel, then fold the aux layers
    params = [*student.parameters(), *amal.aux.parameters()]
    opt = torch.optim.Adam(params, lr=options.layer_lr)

    def layer_step(i: int, total: int) -> dict[str, torch.Tensor]:
        amal.train()
        amal.aes.eval()
        set_lr(opt, cosine_lr(options.layer_lr, i, total))
        x = next(batches)
        features, logits = amal.teacher_features(x)
        with torch.no_grad():
            codes = {b: amal.aes[str(b)].encode(f) for b, f in features.items()}
            target = union(logits)
        parts = amal.part_losses(x, codes, target)
        loss = torch.stack(list(parts.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    loop("layerwise", layer_step, "layer-wise: part-nets")
    folded = amal.folded()

    # Step 3: optional joint fine-tune of the folded (plain) student
    if "finetune" in budgets:
        opt = torch.optim.Adam(folded.parameters(), lr=options.finetune_lr)
        mask = union.multiclass_mask

        def finetune_step(i: int, total: int) -> dict[str, torch.Tensor]:
            folded.train()
            set_lr(opt, cosine_lr(options.finetune_lr, i, total))
            x = next(batches)
            target = union_targets(teachers, union, x)
            scores = folded(x)
            if options.finetune_loss == "mse":
                loss = F.mse_loss(scores, target)
            else:
                loss = union_loss(scores, target, mask, cfg.blocks.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}

        loop("finetune", finetune_step, "layer-wise: joint fine-tune", model=folded)
    folded.eval()
    return folded, stages
