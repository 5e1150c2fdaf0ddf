"""The group-stack generator G = G^B ∘ … ∘ G^1 (paper Eq. 2).

Group ``j`` outputs a feature shaped like the *input* of teacher block ``B-j+1``, i.e. teacher level
``B-j``; the last group outputs the image:

.. math::  F_g^1 = G^1(z),\\qquad F_g^j = G^j(F_g^{j-1}),\\qquad I_g = F_g^B \\in [0,1]^{C\\times H\\times W}

Feature levels use the widest teacher's channel count; the teacher-level filters project to each
teacher's width. Maps are reached by a linear seed or nearest upsampling plus 3x3 convolutions; vector
levels by linear layers. Intermediate features end in BN+ReLU (teacher block outputs are post-ReLU),
the image in a sigmoid (teachers take raw pixels and normalise internally).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Shape = tuple[int, ...]


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


class GeneratorGroup(nn.Module):
    """One group G^j: maps the previous level (or z) to the next level's shape."""

    def __init__(self, in_shape: Shape, out_shape: Shape, hidden: int, is_image: bool):
        super().__init__()
        self.out_shape = out_shape
        layers: list[nn.Module] = []
        if len(out_shape) == 1:  # vector level
            fin = int(torch.tensor(in_shape).prod())
            layers += [
                nn.Flatten(),
                nn.Linear(fin, hidden),
                nn.BatchNorm1d(hidden),
                _act(),
                nn.Linear(hidden, out_shape[0]),
            ]
            tail: list[nn.Module] = [nn.BatchNorm1d(out_shape[0]), nn.ReLU()]
        else:
            c, h, w = out_shape
            if len(in_shape) == 1:  # from z or a vector: linear seed at the target resolution
                layers += [
                    nn.Linear(in_shape[0], hidden * h * w),
                    nn.Unflatten(1, (hidden, h, w)),
                    nn.BatchNorm2d(hidden),
                ]
                cin = hidden
            else:
                layers += [nn.Upsample(size=(h, w), mode="nearest")] if in_shape[1:] != (h, w) else []
                cin = in_shape[0]
            layers += [nn.Conv2d(cin, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), _act()]
            layers += [nn.Conv2d(hidden, c, 3, 1, 1)]
            tail = [nn.Sigmoid()] if is_image else [nn.BatchNorm2d(c), nn.ReLU()]
        self.body = nn.Sequential(*layers, *tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GroupStackGenerator(nn.Module):
    """B stacked groups. ``forward(z)`` returns ``[F_g^1, …, F_g^B]``; the last entry is the image.

    ``level_shapes`` are the teacher levels ``0..B-1`` (image first), as the teachers report them.
    """

    def __init__(
        self, level_shapes: Sequence[Shape], latent_dim: int = 100, widths: Sequence[int] | None = None
    ):
        super().__init__()
        levels = [tuple(s) for s in level_shapes]
        self.num_groups = len(levels)
        self.latent_dim = latent_dim
        widths = list(widths) if widths is not None else [32] * self.num_groups
        if len(widths) != self.num_groups:
            raise ValueError(f"need {self.num_groups} generator widths (one per group), got {len(widths)}")
        # group j (1-based) produces level B-j; groups are listed in generation order.
        targets = [levels[self.num_groups - j] for j in range(1, self.num_groups + 1)]
        groups, prev = [], (latent_dim,)
        for j, (out_shape, hidden) in enumerate(zip(targets, widths), start=1):
            groups.append(GeneratorGroup(prev, out_shape, hidden, is_image=j == self.num_groups))
            prev = out_shape
        self.groups = nn.ModuleList(groups)
        self.out_shapes = targets

    def level_of_group(self, j: int) -> int:
        """Teacher level that group ``j`` (1-based) produces."""
        return self.num_groups - j

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        feats, h = [], z
        for group in self.groups:
            h = group(h)
            feats.append(h)
        return feats

    def sample_latent(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
    ):
        return torch.randn(n, self.latent_dim, generator=generator).to(device or "cpu")
