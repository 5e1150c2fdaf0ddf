"""Parameter and FLOP counts, for reports that put the student next to the teachers it replaces."""

from __future__ import annotations

import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-add FLOPs (2 per MAC) of conv and linear layers for one input of ``input_shape``."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kernel_macs = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        total += 2 * out[0].numel() * kernel_macs

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out[0].numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return total
