"""Classifiers with an explicit block structure: ``B`` blocks plus a head.

Amalgamation works level by level. Level 0 is the image in pixel space ([0, 1]); level ``b`` is the
output of block ``b``; level ``B`` is the pre-head feature. Block ``b`` maps level ``b-1`` to level ``b``:

.. math::  F^0 = x,\\qquad F^b = A^b(F^{b-1}),\\qquad \\text{logits} = \\text{head}(F^B)

Every model takes raw pixels and applies the input normalisation it was trained with as the first
step of block 1, so teachers with different normalisations share one image space.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

Shape = tuple[int, ...]


class BlockClassifier(nn.Module):
    """``blocks[0..B-1]`` followed by ``head``, with the per-level shapes known at construction.

    ``spec`` is the architecture record (name, width, block count, input shape, outputs) from which the
    registry can rebuild the same module; it goes into bundle manifests verbatim.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        *,
        spec: dict[str, Any],
        input_shape: Shape,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
    ):
        super().__init__()
        if len(blocks) < 1:
            raise ValueError("a BlockClassifier needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.spec = dict(spec)
        self.input_shape = tuple(int(s) for s in input_shape)
        channels = self.input_shape[0]
        if len(mean) not in (1, channels) or len(std) not in (1, channels):
            raise ValueError(f"mean/std need 1 or {channels} values, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        # Not persistent: the manifest is the source of truth for normalisation, weights hold only weights.
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1), persistent=False
        )
        self._level_shapes = self._trace_shapes()

    # --- structure -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_outputs(self) -> int:
        return int(self.spec["num_outputs"])

    def level_shapes(self) -> list[Shape]:
        """Shapes (without batch) of levels ``0..B``: the image, each block output, the pre-head feature."""
        return list(self._level_shapes)

    def block_io_shapes(self) -> list[tuple[Shape, Shape]]:
        """``(input_shape, output_shape)`` of each block."""
        s = self._level_shapes
        return [(s[b], s[b + 1]) for b in range(self.num_blocks)]

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    # --- forward ---------------------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def run_blocks(self, h: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Map level ``start`` to level ``stop`` (default ``B``). Level 0 input is raw pixels."""
        stop = self.num_blocks if stop is None else stop
        if start == 0 and stop > 0:
            h = self.normalize(h)
        for block in self.blocks[start:stop]:
            h = block(h)
        return h

    def forward_from(self, h: torch.Tensor, level: int = 0) -> torch.Tensor:
        """Logits from a feature at ``level`` (0 = image)."""
        return self.head(self.run_blocks(h, level))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)

    def _trace_shapes(self) -> list[Shape]:
        was_training = self.training
        self.eval()
        shapes: list[Shape] = [self.input_shape]
        with torch.no_grad():
            h = torch.zeros(1, *self.input_shape)
            h = self.normalize(h)
            for block in self.blocks:
                h = block(h)
                shapes.append(tuple(h.shape[1:]))
            out = self.head(h)
        if out.shape[1:] != (self.num_outputs,):
            raise ValueError(f"head outputs {tuple(out.shape[1:])}, spec says {self.num_outputs}")
        self.train(was_training)
        return shapes


@contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers still normalise with batch statistics in training mode but do
    not update their running statistics (momentum 0)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for teachers and frozen stages."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
        p.grad = None
    return module
