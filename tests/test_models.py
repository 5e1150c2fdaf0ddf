"""Block-structured model families: shapes chain, every parameter learns, the registry rebuilds them."""

from __future__ import annotations

import pytest
import torch

from dfka.errors import ConfigError
from dfka.models import build_model, count_flops, count_params, parse_arch

FAMILIES = ["lenet5", "resnet"]


def make(arch: str, blocks: int, width: float = 1.0, outputs: int = 5, size: int = 28):
    return build_model(
        {
            "arch": arch,
            "blocks": blocks,
            "width": width,
            "num_outputs": outputs,
            "input_shape": [1, size, size],
        }
    )


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_block_shapes_chain(arch: str, blocks: int) -> None:
    model = make(arch, blocks).eval()
    shapes = model.level_shapes()
    assert len(shapes) == blocks + 1 and shapes[0] == (1, 28, 28)
    x = torch.rand(3, 1, 28, 28)
    h = x
    for b, (cin, cout) in enumerate(model.block_io_shapes()):
        assert tuple(h.shape[1:]) == cin
        h = model.run_blocks(h, b, b + 1)
        assert tuple(h.shape[1:]) == cout
    # running from any level gives the same logits as the plain forward
    full = model(x)
    assert full.shape == (3, 5)
    for level in range(blocks + 1):
        feat = model.run_blocks(x, 0, level)
        torch.testing.assert_close(model.forward_from(feat, level), full)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_every_parameter_gets_a_gradient(arch: str, blocks: int) -> None:
    model = make(arch, blocks, width=0.5).train()
    model(torch.rand(4, 1, 28, 28)).logsumexp(1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_families_share_levels_at_three_blocks() -> None:
    lenet, res = make("lenet5", 3), make("resnet", 3)
    assert [s[1:] for s in lenet.level_shapes()[:3]] == [s[1:] for s in res.level_shapes()[:3]]


def test_width_multiplier_shrinks_the_model() -> None:
    full, half = make("lenet5", 3, 1.0), make("lenet5", 3, 0.5)
    assert count_params(half) < count_params(full) / 2.5
    assert count_flops(half, (1, 28, 28)) < count_flops(full, (1, 28, 28))
    assert half.level_shapes()[1] == (3, 14, 14) and full.level_shapes()[1] == (6, 14, 14)


def test_normalisation_is_applied_inside() -> None:
    model = build_model(
        {"arch": "lenet5", "num_outputs": 3, "input_shape": [1, 28, 28]}, mean=[0.5], std=[0.25]
    ).eval()
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model.run_blocks(x, 0, 1), model.blocks[0]((x - 0.5) / 0.25))
    assert model.normalization == {"mean": [0.5], "std": [0.25]}


def test_flops_of_a_linear_layer_are_exact() -> None:
    model = make("lenet5", 3, width=1.0, outputs=10)
    # the head alone: 84 inputs x 10 outputs x 2
    head_flops = count_flops(model.head, (84,))
    assert head_flops == 2 * 84 * 10


def test_registry_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'alexnet'"):
        build_model({"arch": "alexnet", "num_outputs": 2, "input_shape": [1, 28, 28]})
    with pytest.raises(ConfigError, match="no option"):
        build_model({"arch": "lenet5", "depth": 2, "num_outputs": 2, "input_shape": [1, 28, 28]})
    with pytest.raises(ConfigError, match="cannot build"):
        build_model({"arch": "lenet5", "blocks": 7, "num_outputs": 2, "input_shape": [1, 28, 28]})
    assert parse_arch("lenet5:0.5") == {"arch": "lenet5", "width": 0.5}
    assert parse_arch("resnet:1:blocks=2") == {"arch": "resnet", "width": 1.0, "blocks": 2}
    with pytest.raises(ConfigError, match="bad value"):
        parse_arch("lenet5:half")
