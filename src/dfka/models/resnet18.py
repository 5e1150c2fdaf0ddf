"""ResNet-18 (He et al. 2016) for RGB inputs, split into 2, 3 or 4 blocks.

Four residual stages of two BasicBlocks each, widths ``64w, 128w, 256w, 512w``, strides 1, 2, 2, 2,
then global average pooling. The stem follows the input size: a 3x3 stride-1 convolution below 64
pixels a side (the CIFAR variant, so 32x32 keeps its resolution in stage 1), the ImageNet 7x7 stride-2
convolution plus a 3x3 stride-2 max-pool from 64 up (224x224 gives 56, 28, 14 and 7). ``width`` scales
every stage (0.25 gives 16/32/64/128 channels and 0.7M parameters, a CPU-sized teacher).

Block boundaries (levels 1..B for a 32x32 input, ``s`` = stem):

====  ==============================================  =======================================
B     blocks                                          levels 1..B
====  ==============================================  =======================================
2     [s, l1, l2, l3], [l4 + GAP]                     256w x 8 x 8, 512w
3     [s, l1, l2], [l3], [l4 + GAP]                   128w x 16 x 16, 256w x 8 x 8, 512w
4     [s, l1], [l2], [l3], [l4 + GAP]                 64w x 32 x 32, 128w x 16 x 16, ..., 512w
====  ==============================================  =======================================

:func:`dfka.models.vgg.vgg` has the same spatial sizes per level for the same ``B`` and input, so the
two families (and LeNet-5 at ``B = 3`` on 32x32) can be amalgamated together.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dfka.models.base import BlockClassifier
from dfka.models.resnet import BasicBlock

#: From this input side up, the ImageNet stem (stride 4 in all) replaces the CIFAR one.
IMAGENET_STEM_FROM = 64


def stem(cin: int, cout: int, side: int) -> nn.Sequential:
    """The CIFAR stem below ``IMAGENET_STEM_FROM`` pixels a side, the ImageNet one from there up."""
    if side < IMAGENET_STEM_FROM:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))
    return nn.Sequential(
        nn.Conv2d(cin, cout, 7, 2, 3, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(True),
        nn.MaxPool2d(3, 2, 1),
    )


def resnet18(
    num_outputs: int,
    *,
    width: float = 1.0,
    blocks: int = 4,
    input_shape: Sequence[int] = (3, 32, 32),
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> BlockClassifier:
    if blocks not in (2, 3, 4):
        raise ValueError(f"resnet18 supports 2, 3 or 4 blocks, got {blocks}")
    cin, height, width_px = input_shape
    if min(height, width_px) < 16:
        raise ValueError(f"resnet18 needs inputs of at least 16x16, got {height}x{width_px}")
    widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
    layers = [
        nn.Sequential(BasicBlock(widths[max(i - 1, 0)], widths[i], stride), BasicBlock(widths[i], widths[i]))
        for i, stride in enumerate((1, 2, 2, 2))
    ]
    first = stem(cin, widths[0], min(height, width_px))
    last = nn.Sequential(layers[3], nn.AdaptiveAvgPool2d(1), nn.Flatten())
    grouped: dict[int, list[nn.Module]] = {
        2: [nn.Sequential(first, *layers[:3]), last],
        3: [nn.Sequential(first, *layers[:2]), layers[2], last],
        4: [nn.Sequential(first, layers[0]), layers[1], layers[2], last],
    }
    spec = {
        "arch": "resnet18",
        "width": width,
        "blocks": blocks,
        "input_shape": list(input_shape),
        "num_outputs": num_outputs,
    }
    return BlockClassifier(
        grouped[blocks],
        nn.Linear(widths[3], num_outputs),
        spec=spec,
        input_shape=tuple(input_shape),
        mean=mean,
        std=std,
    )
