"""The frozen, named teacher collection and the customised label set Y_cst.

For teacher ``m`` with labels ``Y_m`` and a target set ``Y_cst`` (any subset of the union, any order),
the task-level filter ``g_m`` keeps the outputs of ``m`` that belong to ``Y_cst``:

.. math::  g_m(o) = o[\\,\\text{sel}_m\\,],\\qquad \\text{sel}_m = [\\,i : Y_m[i] \\in Y_{cst}\\,]

and ``pos_m`` says where those outputs land in ``Y_cst``. A label owned by several teachers is averaged.
Teachers whose labels miss ``Y_cst`` entirely are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dfka.engine import fast
from dfka.errors import CompatibilityError, LabelError
from dfka.models import BlockClassifier, count_flops, count_params, freeze

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherInfo:
    """What the amalgamation needs to know about one teacher besides its module."""

    name: str
    labels: tuple[str, ...]
    task: str  # "multiclass" | "multilabel"
    sel: tuple[int, ...]  # indices into the teacher's outputs, for labels in Y_cst
    pos: tuple[int, ...]  # positions of those labels in Y_cst


class TeacherSet(fast.FrozenTeachers):
    """M frozen teachers keyed by name, plus the mapping of their outputs onto ``Y_cst``.

    Teachers are frozen at construction (eval mode, ``requires_grad=False``) and stay in eval mode even
    when a parent module calls ``.train()``, so no stage can change them, not even their BN statistics.
    """

    def __init__(
        self,
        teachers: Mapping[str, BlockClassifier],
        labels: Mapping[str, Sequence[str]],
        tasks: Mapping[str, str],
        target_labels: Sequence[str] | None = None,
        path: fast.ComputePath = fast.FAST,
    ):
        super().__init__()
        #: the compute path of every stage built on this set (:class:`~dfka.engine.fast.ComputePath`)
        self.path = path
        if len(teachers) < 2:
            raise CompatibilityError(
                f"amalgamation needs at least 2 teachers, got {len(teachers)}",
                "pass two or more teacher bundles (use plain KD for a single teacher)",
            )
        union: list[str] = []
        for name in teachers:
            if len(labels[name]) != teachers[name].num_outputs:
                raise CompatibilityError(
                    f"teacher {name}: {len(labels[name])} labels for {teachers[name].num_outputs} outputs"
                )
            if tasks[name] not in ("multiclass", "multilabel"):
                raise CompatibilityError(
                    f"teacher {name}: unknown task {tasks[name]!r}", "use multiclass or multilabel"
                )
            union += [label for label in labels[name] if label not in union]
        target = list(target_labels) if target_labels is not None else union
        _check_target(target, union)

        infos: dict[str, TeacherInfo] = {}
        for name in teachers:
            sel = tuple(i for i, label in enumerate(labels[name]) if label in target)
            if not sel:
                log.warning("teacher %s owns none of the target labels; it is dropped", name)
                continue
            pos = tuple(target.index(labels[name][i]) for i in sel)
            infos[name] = TeacherInfo(name, tuple(labels[name]), tasks[name], sel, pos)
        self.infos = infos
        self.target_labels = target
        self.models = nn.ModuleDict({name: freeze(teachers[name]) for name in infos})
        check_compatible({n: teachers[n] for n in infos})
        # owners[y] = number of teachers that own target label y (for averaging shared labels)
        owners = torch.zeros(len(target))
        for info in infos.values():
            owners[list(info.pos)] += 1
        self.register_buffer("owners", owners, persistent=False)

    # --- structure ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def __iter__(self) -> Iterator[tuple[str, BlockClassifier]]:
        return iter(self.models.items())

    def __len__(self) -> int:
        return len(self.models)

    @property
    def num_blocks(self) -> int:
        return next(iter(self.models.values())).num_blocks

    @property
    def input_shape(self) -> tuple[int, ...]:
        return next(iter(self.models.values())).input_shape

    @property
    def label_tasks(self) -> list[str]:
        """The task type of each target label (from its first owner)."""
        tasks = [""] * len(self.target_labels)
        for info in reversed(list(self.infos.values())):
            for p in info.pos:
                tasks[p] = info.task
        return tasks

    @property
    def task(self) -> str:
        """``multiclass`` or ``multilabel`` when all teachers agree, else ``mixed``."""
        kinds = {info.task for info in self.infos.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def level_channels(self, level: int) -> dict[str, int]:
        return {name: m.level_shapes()[level][0] for name, m in self.models.items()}

    def level_shape(self, level: int) -> tuple[int, ...]:
        """Shape at ``level`` with the widest teacher's channel count (the generator's working width)."""
        shapes = [m.level_shapes()[level] for m in self.models.values()]
        return (max(s[0] for s in shapes), *shapes[0][1:])

    def compute_models(self) -> dict[str, BlockClassifier]:
        """The modules the stages evaluate: on the fast path, compute copies of the teachers (BatchNorm
        folded, channels-last, see :mod:`dfka.engine.fast`), built once and kept as a submodule
        without state; on the reference path, the teachers themselves. Outputs agree up to float
        rounding, and the teachers are never modified."""
        if not self.path.fast:
            return dict(self.models.items())
        if "compute" not in self._modules:
            self.compute = fast.ComputeTeachers(dict(self.models.items()))
        return dict(self.compute.models.items())

    def select(self, name: str, logits: torch.Tensor) -> torch.Tensor:
        """The task-level filter g_m: teacher ``name``'s outputs that belong to Y_cst."""
        return logits[:, list(self.infos[name].sel)]

    def train(self, mode: bool = True) -> TeacherSet:
        super().train(mode)
        self.models.eval()  # teachers never leave eval mode
        return self

    def report(self) -> dict[str, object]:
        """Labels per teacher, overlaps, params and FLOPs: the ingestion stage's report."""
        per_teacher = {}
        for name, model in self.models.items():
            info = self.infos[name]
            per_teacher[name] = {
                "labels": list(info.labels),
                "task": info.task,
                "target_labels": [info.labels[i] for i in info.sel],
                "params": count_params(model),
                "flops": count_flops(model, model.input_shape),
                "arch": dict(model.spec),
                "level_shapes": [list(s) for s in model.level_shapes()],
            }
        shared = [y for y, n in zip(self.target_labels, self.owners.tolist()) if n > 1]
        return {
            "target_labels": list(self.target_labels),
            "teachers": per_teacher,
            "shared_labels": shared,
            "task": self.task,
            "params_total": sum(t["params"] for t in per_teacher.values()),
            "flops_total": sum(t["flops"] for t in per_teacher.values()),
        }


def _check_target(target: list[str], union: list[str]) -> None:
    if not target:
        raise LabelError(
            "the target label set is empty", "list at least one label, or omit it to use the union"
        )
    dupes = sorted({y for y in target if target.count(y) > 1})
    if dupes:
        raise LabelError(f"duplicate target labels {dupes}", "list each label once")
    unknown = [y for y in target if y not in union]
    if unknown:
        raise LabelError(
            f"target labels {unknown} are not owned by any teacher",
            f"choose from the teachers' labels: {', '.join(union)}",
        )


def check_compatible(models: Mapping[str, BlockClassifier]) -> None:
    """Teachers may differ in width and family, but not in input shape, block count or spatial shapes.

    Levels 0..B-1 are block inputs that the generator produces, so their spatial sizes (and the image's
    channels) must agree. Channel counts at levels >= 1 may differ: the filters project between widths.
    """
    items = list(models.items())
    ref_name, ref = items[0]
    for name, model in items[1:]:
        if model.input_shape != ref.input_shape:
            raise CompatibilityError(
                f"teacher {name} takes input {model.input_shape} but {ref_name} takes {ref.input_shape}",
                "amalgamate teachers trained at the same input size and channel count",
            )
        if model.num_blocks != ref.num_blocks:
            raise CompatibilityError(
                f"teacher {name} has {model.num_blocks} blocks but {ref_name} has {ref.num_blocks}",
                "export the teachers with the same block count (e.g. the 'blocks' option of the architecture)",
            )
        for level in range(1, ref.num_blocks):
            a, b = ref.level_shapes()[level], model.level_shapes()[level]
            if len(a) != len(b) or a[1:] != b[1:]:
                raise CompatibilityError(
                    f"level {level} differs: teacher {ref_name} gives {a}, teacher {name} gives {b} "
                    "(block inputs must agree in spatial shape)",
                    "choose block splits whose intermediate feature maps have the same spatial size",
                )


def check_student(student: BlockClassifier, teachers: TeacherSet) -> None:
    """The student must match the teachers' levels the same way teachers match each other."""
    ref_name, ref = next(iter(teachers))
    if student.input_shape != ref.input_shape:
        raise CompatibilityError(f"student input {student.input_shape} != teachers' {ref.input_shape}")
    if student.num_blocks != ref.num_blocks:
        raise CompatibilityError(
            f"student has {student.num_blocks} blocks, teachers have {ref.num_blocks}",
            f"use a student with blocks={ref.num_blocks} (e.g. --student lenet5:0.5:blocks={ref.num_blocks})",
        )
    for level in range(1, ref.num_blocks):
        a, b = ref.level_shapes()[level], student.level_shapes()[level]
        if len(a) != len(b) or a[1:] != b[1:]:
            raise CompatibilityError(
                f"student level {level} is {b} but teacher {ref_name} gives {a}",
                "pick a student family/block split with the same spatial shapes per level",
            )
