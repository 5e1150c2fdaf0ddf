"""VGG-11 with BatchNorm (Simonyan & Zisserman 2015) for RGB inputs, split into 2, 3 or 4 blocks.

Layers (``w`` scales every width): conv64, M, conv128, M, conv256 x2, M, conv512 x2, M, conv512 x2,
then global average pooling and one linear head (no 4096-wide classifier: the head is where the label
count changes, and the pre-head feature is the last level). Each conv is 3x3 + BN + ReLU, ``M`` a 2x2
max-pool. From 64 pixels a side up, the first conv has stride 2 and a max-pool follows it, so the
levels shrink by 4 before the first block ends, as ResNet-18's ImageNet stem does.

Blocks start at a pooling layer, so the levels have ResNet-18's spatial sizes for the same ``B``
(32x32 input):

====  ==========================================================  =====================================
B     blocks                                                      levels 1..B
====  ==========================================================  =====================================
2     [c64, M, c128, M, c256 x2], [M, c512 x2, M, c512 x2, GAP]    256w x 8 x 8, 512w
3     [c64, M, c128], [M, c256 x2], [M, c512 x2, M, c512 x2, GAP]  128w x 16 x 16, 256w x 8 x 8, 512w
4     [c64], [M, c128], [M, c256 x2], [M, c512 x2, M, ...]         64w x 32 x 32, 128w x 16 x 16, ..., 512w
====  ==========================================================  =====================================
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dfka.models.base import BlockClassifier
from dfka.models.resnet18 import IMAGENET_STEM_FROM


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def vgg(
    num_outputs: int,
    *,
    width: float = 1.0,
    blocks: int = 4,
    input_shape: Sequence[int] = (3, 32, 32),
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> BlockClassifier:
    if blocks not in (2, 3, 4):
        raise ValueError(f"vgg supports 2, 3 or 4 blocks, got {blocks}")
    cin, height, width_px = input_shape
    side = min(height, width_px)
    if side < 16:
        raise ValueError(f"vgg needs inputs of at least 16x16, got {height}x{width_px}")
    c1, c2, c3, c4 = (max(1, round(c * width)) for c in (64, 128, 256, 512))
    pool = nn.MaxPool2d(2)
    first = _conv(cin, c1) if side < IMAGENET_STEM_FROM else [*_conv(cin, c1, stride=2), nn.MaxPool2d(2)]
    # the four pieces that always start at a pool (except the first)
    p1 = first
    p2 = [pool, *_conv(c1, c2)]
    p3 = [nn.MaxPool2d(2), *_conv(c2, c3), *_conv(c3, c3)]
    p4 = [
        nn.MaxPool2d(2),
        *_conv(c3, c4),
        *_conv(c4, c4),
        nn.MaxPool2d(2),
        *_conv(c4, c4),
        *_conv(c4, c4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    grouped: dict[int, list[list[nn.Module]]] = {
        2: [[*p1, *p2, *p3], p4],
        3: [[*p1, *p2], p3, p4],
        4: [p1, p2, p3, p4],
    }
    spec = {
        "arch": "vgg",
        "width": width,
        "blocks": blocks,
        "input_shape": list(input_shape),
        "num_outputs": num_outputs,
    }
    return BlockClassifier(
        [nn.Sequential(*layers) for layers in grouped[blocks]],
        nn.Linear(c4, num_outputs),
        spec=spec,
        input_shape=tuple(input_shape),
        mean=mean,
        std=std,
    )
