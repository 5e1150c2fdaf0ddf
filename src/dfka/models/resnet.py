"""Small ResNet-style classifiers split into 2, 3 or 4 blocks.

A 3x3 stem, then one residual stage per block (``depth`` BasicBlocks each, widths 16w, 32w, 64w, 64w),
with global average pooling closing the last block. The first two stages halve the resolution, so at
28x28 the levels match LeNet-5's (14x14, then 7x7) and the two families can be amalgamated together.

====  ==================================================  ===============================
B     stages (stride)                                     levels 1..B (28x28 input)
====  ==================================================  ===============================
2     [stem, s1(2), s2(2)], [s3(1)+GAP]                   32w x 7 x 7, 64w
3     [stem, s1(2)], [s2(2)], [s3(1)+GAP]                 16w x 14 x 14, 32w x 7 x 7, 64w
4     [stem, s1(2)], [s2(2)], [s3(1)], [s4(1)+GAP]        ..., 64w x 7 x 7, 64w
====  ==================================================  ===============================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dfka.models.base import BlockClassifier


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(cin: int, cout: int, stride: int, depth: int) -> nn.Sequential:
    return nn.Sequential(
        *[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(depth)]
    )


def resnet(
    num_outputs: int,
    *,
    width: float = 1.0,
    blocks: int = 3,
    depth: int = 1,
    input_shape: Sequence[int] = (1, 28, 28),
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> BlockClassifier:
    if blocks not in (2, 3, 4):
        raise ValueError(f"resnet supports 2, 3 or 4 blocks, got {blocks}")
    cin = input_shape[0]
    widths = [max(1, round(c * width)) for c in (16, 32, 64, 64)]
    strides = [2, 2, 1, 1]
    n_stages = blocks if blocks > 2 else 3
    stem = nn.Sequential(
        nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)
    )
    stages = [_stage(widths[max(i - 1, 0)], widths[i], strides[i], depth) for i in range(n_stages)]
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    if blocks == 2:
        grouped: list[nn.Module] = [nn.Sequential(stem, stages[0], stages[1]), nn.Sequential(stages[2], pool)]
    else:
        grouped = [nn.Sequential(stem, stages[0]), *stages[1:-1], nn.Sequential(stages[-1], pool)]
    spec = {
        "arch": "resnet",
        "width": width,
        "blocks": blocks,
        "depth": depth,
        "input_shape": list(input_shape),
        "num_outputs": num_outputs,
    }
    return BlockClassifier(
        grouped,
        nn.Linear(widths[n_stages - 1], num_outputs),
        spec=spec,
        input_shape=tuple(input_shape),
        mean=mean,
        std=std,
    )
