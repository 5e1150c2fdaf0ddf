"""Stage 3: regroup the dual generator into the TargetNet, and save, load and export it.

The TargetNet is a shared trunk (student blocks ``1..B``) followed by one light branch per teacher
(gate + linear head over that teacher's labels in Y_cst). A fixed assembly matrix places every branch
output at its label's position in Y_cst and averages labels that several teachers own:

.. math::  s = [\\,\\beta_1(h)\\,;\\,\\dots\\,;\\,\\beta_M(h)\\,]\\,A,\\qquad h = \\mathcal T^B\\circ\\dots\\circ\\mathcal T^1(x)

It takes raw pixels in [0, 1] (normalisation is inside), outputs one score per label of Y_cst in the
user's order, and carries its label names. Saved as ``targetnet.safetensors`` + ``targetnet.json``
and exported as TorchScript (``targetnet.torchscript.pt``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from dfka import __version__
from dfka.amalgamation.batch import SampleBatch
from dfka.amalgamation.config import RegroupConfig
from dfka.amalgamation.origin import (
    LabelTargets,
    OriginSlots,
    agrees_with_target,
    cross_teacher_mix,
    routed_to_origin,
    shift,
    student_origin_terms,
)
from dfka.amalgamation.stage2 import Branch, DualGenerator
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule, union_loss
from dfka.bundles import sha256_file
from dfka.engine import distributed as dist
from dfka.engine import fast
from dfka.engine.loop import cosine_lr, set_lr
from dfka.errors import BundleError
from dfka.models import build_model

MANIFEST = "targetnet.json"
WEIGHTS = "targetnet.safetensors"
TORCHSCRIPT = "targetnet.torchscript.pt"
FORMAT = "dfka.targetnet/v1"


class TargetNet(nn.Module):
    def __init__(
        self,
        student_spec: dict[str, Any],
        branches: dict[str, Sequence[int]],
        label_names: Sequence[str],
        label_tasks: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
    ):
        """``branches[name]`` lists the Y_cst positions of that teacher's branch outputs, in order."""
        super().__init__()
        student = build_model(student_spec, mean=mean, std=std)
        self.student_spec = dict(student_spec)
        self.blocks = student.blocks
        self.input_shape = student.input_shape
        self.register_buffer("mean", student.mean.clone(), persistent=False)
        self.register_buffer("std", student.std.clone(), persistent=False)
        features = int(torch.tensor(student.level_shapes()[-1]).prod())
        self.branch_positions = {name: list(pos) for name, pos in branches.items()}
        self.branches = nn.ModuleDict({name: Branch(features, len(pos)) for name, pos in branches.items()})
        self.label_names = list(label_names)
        self.label_tasks = list(label_tasks)
        assembly = torch.zeros(sum(len(p) for p in branches.values()), len(label_names))
        row = 0
        for pos in branches.values():
            for p in pos:
                assembly[row, p] = 1.0
                row += 1
        assembly /= assembly.sum(0, keepdim=True).clamp_min(1)
        self.register_buffer("assembly", assembly, persistent=False)

    @classmethod
    def from_dual(cls, dual: DualGenerator, label_tasks: Sequence[str]) -> TargetNet:
        student = dual.student
        net = cls(
            {**student.spec},
            {name: dual.teachers.infos[name].pos for name in dual.branches},
            dual.teachers.target_labels,
            label_tasks,
            student.normalization["mean"],
            student.normalization["std"],
        )
        net.blocks.load_state_dict(student.blocks.state_dict())
        net.branches.load_state_dict(dual.branches.state_dict())
        return net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return torch.cat([branch(h) for branch in self.branches.values()], 1) @ self.assembly

    @property
    def multiclass_mask(self) -> torch.Tensor:
        return torch.tensor([t == "multiclass" for t in self.label_tasks])


class TargetNetManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: str = FORMAT
    student: dict[str, Any]
    branches: dict[str, list[int]]
    labels: list[str]
    label_tasks: list[str]
    input: dict[str, Any]
    metrics: dict[str, float] = {}
    provenance: dict[str, Any] = {}
    weights_sha256: str
    created_by: str = f"dfka {__version__}"


def save_targetnet(
    net: TargetNet,
    out: str,
    *,
    metrics: dict[str, float] | None = None,
    provenance: dict[str, Any] | None = None,
) -> TargetNetManifest:
    """Write weights, TorchScript and the manifest (last) to ``out`` (dir or ``s3://``)."""
    from dfka import storage

    net = net.eval()
    with tempfile.TemporaryDirectory(prefix="dfka-targetnet-") as tmp:
        local = Path(tmp)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(local / WEIGHTS)
        )
        example = torch.rand(2, *net.input_shape)
        with torch.no_grad():
            traced = torch.jit.trace(net.cpu(), example)
        traced.save(str(local / TORCHSCRIPT))
        manifest = TargetNetManifest(
            student=net.student_spec,
            branches=net.branch_positions,
            labels=net.label_names,
            label_tasks=net.label_tasks,
            input={
                "shape": list(net.input_shape),
                "pixel_range": [0.0, 1.0],
                "mean": net.mean.flatten().tolist(),
                "std": net.std.flatten().tolist(),
            },
            metrics=dict(metrics or {}),
            provenance=dict(provenance or {}),
            weights_sha256=sha256_file(local / WEIGHTS),
        )
        (local / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        for name in (WEIGHTS, TORCHSCRIPT, MANIFEST):
            storage.put_file(local / name, storage.join(out, name))
    return manifest


def load_targetnet(uri: str) -> tuple[TargetNet, TargetNetManifest]:
    """Rebuild a TargetNet from its manifest and safetensors weights (verified by sha256)."""
    from dfka import storage

    with tempfile.TemporaryDirectory(prefix="dfka-targetnet-") as tmp:
        local = Path(tmp)
        for name in (MANIFEST, WEIGHTS):
            if not storage.exists(storage.join(uri, name)):
                raise BundleError(
                    f"{storage.join(uri, name)} does not exist", "point at a regroup stage output"
                )
            storage.get_file(storage.join(uri, name), local / name)
        manifest = TargetNetManifest.model_validate(json.loads((local / MANIFEST).read_text()))
        if sha256_file(local / WEIGHTS) != manifest.weights_sha256:
            raise BundleError(
                f"{uri}/{WEIGHTS} does not match its manifest's sha256", "re-run the regroup stage"
            )
        net = TargetNet(
            manifest.student,
            manifest.branches,
            manifest.labels,
            manifest.label_tasks,
            manifest.input["mean"],
            manifest.input["std"],
        )
        net.load_state_dict(load_file(str(local / WEIGHTS)), strict=True)
    return net.eval(), manifest


class FinetuneTrainer:
    r"""End-to-end fine-tune of the whole TargetNet on generated samples.

    Plain samples: KD toward the teachers' union. Origin-labelled samples (``origin`` given, see
    :mod:`dfka.amalgamation.origin`):

    .. math::  L = w_{ce} L_{ce} + w_{own} L_{own\,kd} + w_{which} L_{which} + w_{union} L_{union}

    with the random shift applied to every image, as stage 1 did before the teachers. Label-conditioned
    samples (``targets`` given, multi-label teachers):

    .. math::  L = w_{bce}\,\mathrm{BCE}(s, t) + w_{union}\,\mathrm{BCE}(s, \sigma(u))

    with ``t`` the sample's target and ``u`` the teachers' union; with ``agree_only`` only the samples
    whose union gives exactly ``t`` count.
    """

    def __init__(
        self,
        net: TargetNet,
        union: UnionRule,
        cfg: RegroupConfig,
        batches: Iterator[SampleBatch],
        device: torch.device,
        *,
        origin: OriginSlots | None = None,
        teachers: TeacherSet | None = None,
        union_weight: float = 1.0,
        seed: int = 0,
        path: fast.ComputePath = fast.FAST,
        targets: LabelTargets | None = None,
    ):
        self.path = path
        self.net = path.accelerate(dist.sync_batchnorm(net.to(device)), device)
        self.device = device
        self.union = union
        self.cfg = cfg
        self.batches = batches
        self.origin = origin
        self.teachers = teachers
        self.union_weight = union_weight
        self.targets = targets
        self.rng = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, **path.adam_options(device))
        self.mix = 0
        if origin is not None and teachers is not None and cfg.origin.mix > 0:
            self.mix = max(1, round(cfg.origin.mix * cfg.batch_size))
            self.compute = teachers.compute_models()

    def step(self, step: int, total: int) -> dict[str, torch.Tensor]:
        self.net.train()
        set_lr(self.optimizer, cosine_lr(self.cfg.lr, step, total))
        batch = next(self.batches)
        with torch.no_grad():
            target = self.union(batch.logits)
        image = batch.image
        mixed = mix_target = None
        if self.mix:
            mixed = cross_teacher_mix(image, self.origin, self.origin.decode(batch.z), self.mix, self.rng)
            mixed = shift(mixed, self.cfg.augment_shift, self.rng)
            with torch.no_grad(), self.path.autocast(self.device):
                mix_logits = {name: m(mixed).float() for name, m in self.compute.items()}
            mix_target = self.union(mix_logits)
        if self.origin is not None or self.targets is not None:
            image = shift(image, self.cfg.augment_shift, self.rng)
        with self.path.autocast(self.device):
            scores = self.net(image if mixed is None else torch.cat([image, mixed]))
        scores = scores.float()
        if mixed is not None:
            scores, mix_scores = scores[: len(image)], scores[len(image) :]
        tau = self.cfg.temperature if self.origin is None else self.cfg.origin.union_temperature
        parts = {"union": union_loss(scores, target, self.union.multiclass_mask, tau)}
        if self.targets is not None:
            w = self.cfg.targets
            t = self.targets.decode(batch.z).to(scores.device)
            if w.agree_only:
                keep = agrees_with_target(target, t)
                parts["kept"] = keep.float().mean()
                if dist.any_rank(keep.any()):
                    scores, target, t = scores[keep], target[keep], t[keep]
                    parts["union"] = union_loss(scores, target, self.union.multiclass_mask, tau)
                else:
                    parts["union"] = scores.sum() * 0.0
                    scores = scores[:0]
            if dist.world().size > 1:  # a mean over the kept samples of every rank
                parts["target"] = dist.mean(F.binary_cross_entropy_with_logits(scores, t, reduction="none"))
            else:
                parts["target"] = (
                    F.binary_cross_entropy_with_logits(scores, t) if len(scores) else parts["union"] * 0.0
                )
            loss = w.bce * parts["target"] + w.union_kd * parts["union"]
        elif self.origin is None:
            loss = parts["union"]
        else:
            w = self.cfg.origin
            slots = self.origin.decode(batch.z)
            logits, keep = batch.logits, None
            if w.routed_only != "off":
                keep = routed_to_origin(target, self.origin, slots)
            if w.routed_only == "all" and dist.any_rank(keep.any()):
                # the samples the union sends elsewhere are ambiguous: no term learns from them
                cpu = keep.cpu()
                scores, target, slots = scores[keep], target[keep], slots[cpu]
                logits = {k: v[keep] for k, v in logits.items()}
                keep = None
                parts = {"union": union_loss(scores, target, self.union.multiclass_mask, tau)}
            parts |= student_origin_terms(
                scores, self.teachers, self.origin, logits, slots, w.temperature, keep=keep
            )
            loss = (
                w.ce * parts["ce"]
                + w.own_kd * parts["own_kd"]
                + w.which * parts["which"]
                + self.union_weight * parts["union"]
            )
            if mix_target is not None:
                parts["mix"] = union_loss(mix_scores, mix_target, self.union.multiclass_mask, tau)
                loss = loss + w.mix_weight * parts["mix"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(self.net.parameters())
        self.optimizer.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
