"""Toy teachers for fast engine tests: tiny models trained in well under a second on synthetic images.

Each class is a fixed random 12x12 prototype; samples are the prototype plus noise. Teachers see only
their own classes, like the real benchmark's disjoint label subsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dfka.bundles import TeacherBundle, TeacherManifest
from dfka.models import BlockClassifier, build_model

SIZE = 12
NUM_CLASSES = 8
LABELS = [f"toy_{i}" for i in range(NUM_CLASSES)]


def prototypes() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return (torch.rand(NUM_CLASSES, 1, SIZE, SIZE, generator=g) > 0.6).float()


def toy_batch(
    classes: Sequence[int], n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    protos = prototypes()
    idx = torch.randint(len(classes), (n,), generator=generator)
    cls = torch.tensor(list(classes))[idx]
    x = (protos[cls] * 0.8 + 0.2 * torch.rand(n, 1, SIZE, SIZE, generator=generator)).clamp(0, 1)
    return x, idx


def toy_teacher(
    classes: Sequence[int],
    *,
    arch: str = "lenet5",
    blocks: int = 3,
    width: float = 0.5,
    task: str = "multiclass",
    steps: int = 60,
    seed: int = 0,
    name: str | None = None,
    labels: Sequence[str] | None = None,
) -> TeacherBundle:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    spec = {
        "arch": arch,
        "blocks": blocks,
        "width": width,
        "num_outputs": len(classes),
        "input_shape": [1, SIZE, SIZE],
    }
    model: BlockClassifier = build_model(spec, mean=[0.3], std=[0.4])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x, y = toy_batch(classes, 64, g)
        logits = model(x)
        loss = (
            F.cross_entropy(logits, y)
            if task == "multiclass"
            else F.binary_cross_entropy_with_logits(logits, F.one_hot(y, len(classes)).float())
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    label_names = list(labels) if labels is not None else [LABELS[c] for c in classes]
    manifest = TeacherManifest(
        name=name or f"toy-{'-'.join(map(str, classes))}",
        arch=model.spec,
        block_count=model.num_blocks,
        level_shapes=[list(s) for s in model.level_shapes()],
        input={"shape": [1, SIZE, SIZE], "mean": [0.3], "std": [0.4]},
        labels=label_names,
        task=task,
        weights={"sha256": "0" * 64, "bytes": 1},
    )
    return TeacherBundle(manifest=manifest, model=model, source="toy")
