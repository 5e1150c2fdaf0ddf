"""LeNet-5-style classifiers (with BatchNorm) split into 2, 3 or 4 blocks.

Layers (width multiplier ``w``): conv5x5(6w)-BN-ReLU-pool, conv5x5(16w)-BN-ReLU-pool, fc(120w)-BN-ReLU,
fc(84w)-BN-ReLU, head. Both convolutions are padded, so 28x28 inputs give 14x14 and 7x7 feature maps,
which the generator can reach by two 2x upsamplings. Grouping into blocks:

====  ==========================================  ===========================
B     blocks                                      levels 1..B (28x28 input)
====  ==========================================  ===========================
2     [conv1+conv2], [fc1+fc2]                    16w x 7 x 7, 84w
3     [conv1], [conv2], [fc1+fc2]                 6w x 14 x 14, 16w x 7 x 7, 84w
4     [conv1], [conv2], [fc1], [fc2]              ..., 120w, 84w
====  ==========================================  ===========================
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from dfka.models.base import BlockClassifier


def _scaled(base: int, width: float) -> int:
    return max(1, round(base * width))


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 5, padding=2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def _fc(fin: int, fout: int, flatten: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(fin, fout, bias=False), nn.BatchNorm1d(fout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def lenet5(
    num_outputs: int,
    *,
    width: float = 1.0,
    blocks: int = 3,
    input_shape: Sequence[int] = (1, 28, 28),
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
) -> BlockClassifier:
    if blocks not in (2, 3, 4):
        raise ValueError(f"lenet5 supports 2, 3 or 4 blocks, got {blocks}")
    cin, height, width_px = input_shape
    if height % 4 or width_px % 4:
        raise ValueError(f"lenet5 needs an input size divisible by 4, got {height}x{width_px}")
    c1, c2, f1, f2 = (_scaled(n, width) for n in (6, 16, 120, 84))
    flat = c2 * (height // 4) * (width_px // 4)
    conv1, conv2 = _conv(cin, c1), _conv(c1, c2)
    fc1, fc2 = _fc(flat, f1, flatten=True), _fc(f1, f2)
    grouped: dict[int, list[nn.Module]] = {
        2: [nn.Sequential(conv1, conv2), nn.Sequential(fc1, fc2)],
        3: [conv1, conv2, nn.Sequential(fc1, fc2)],
        4: [conv1, conv2, fc1, fc2],
    }
    spec = {
        "arch": "lenet5",
        "width": width,
        "blocks": blocks,
        "input_shape": list(input_shape),
        "num_outputs": num_outputs,
    }
    return BlockClassifier(
        grouped[blocks],
        nn.Linear(f2, num_outputs),
        spec=spec,
        input_shape=tuple(input_shape),
        mean=mean,
        std=std,
    )
