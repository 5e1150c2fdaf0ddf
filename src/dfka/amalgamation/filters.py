"""Teacher-level filters f_m and width adaptors.

The paper's filter is "a global pooling layer and two fully connected layers". Its output must still
be a feature map that teacher ``m``'s next block accepts, so we read it as an SE-style channel gate:

.. math::  f(F) = P(F) \\odot \\sigma\\big(W_2\\,\\mathrm{ReLU}(W_1\\,\\mathrm{GAP}(P(F)))\\big)

where ``P`` is a 1x1 projection, present only when the incoming width differs from the teacher's.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelGate(nn.Module):
    """Squeeze-and-excitation gate over channels of a (N,C,H,W) map or a (N,C) vector."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        # Start close to the identity (gate ≈ 0.95), so an untrained filter passes features through;
        # small (not zero) weights keep a gradient flowing into the first layer from the start.
        nn.init.normal_(self.fc[2].weight, std=0.01)
        nn.init.constant_(self.fc[2].bias, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        gate = torch.sigmoid(self.fc(squeezed))
        return x * (gate[:, :, None, None] if x.dim() == 4 else gate)


def projection(cin: int, cout: int, spatial: bool) -> nn.Module:
    """A 1x1 convolution (maps) or a linear map (vectors) between widths; identity when they agree."""
    if cin == cout:
        return nn.Identity()
    return nn.Conv2d(cin, cout, 1) if spatial else nn.Linear(cin, cout)


class TeacherFilter(nn.Module):
    """f_m: optional width projection followed by a channel gate."""

    def __init__(self, cin: int, cout: int, spatial: bool):
        super().__init__()
        self.project = projection(cin, cout, spatial)
        self.gate = ChannelGate(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.project(x))
