"""The architecture extension point and the RGB families: entry points, allowed import paths, ResNet-18
and VGG with matching levels, and one clear error for every way a user's factory can be wrong."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from dfka.amalgamation.teacher_set import check_compatible
from dfka.bundles import load_bundle, save_bundle
from dfka.errors import BundleError, ConfigError
from dfka.models import BlockClassifier, build_model, parse_arch
from dfka.models.registry import ENTRY_POINT_GROUP, available, lookup
from dfka.settings import ARCH_MODULES_ENV

HERE = __name__  # "tests.test_architectures": the module the import-path tests allow


def tiny_net(
    num_outputs: int, *, input_shape, mean, std, width: float = 1.0, blocks: int = 3
) -> BlockClassifier:
    """A user's own family, defined outside dfka: B conv blocks (each halving the map), GAP in the last."""
    c = max(1, round(8 * width))
    cin = input_shape[0]
    stages: list[nn.Module] = []
    for b in range(blocks):
        layers: list[nn.Module] = [nn.Conv2d(cin if b == 0 else c, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU()]
        if b == blocks - 1:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        stages.append(nn.Sequential(*layers))
    return BlockClassifier(
        stages,
        nn.Linear(c, num_outputs),
        spec={"arch": "anything", "num_outputs": num_outputs},
        input_shape=tuple(input_shape),
        mean=mean,
        std=std,
    )


def raising_net(num_outputs: int, *, input_shape, mean, std) -> BlockClassifier:
    raise RuntimeError("the factory is broken")


def plain_module(num_outputs: int, *, input_shape, mean, std) -> nn.Module:
    return nn.Linear(3, num_outputs)


def ignores_outputs(num_outputs: int, *, input_shape, mean, std) -> BlockClassifier:
    return tiny_net(num_outputs + 1, input_shape=input_shape, mean=mean, std=std)


def rgb(arch: str, blocks: int, *, size: int = 32, width: float = 0.25, outputs: int = 5) -> BlockClassifier:
    return build_model(
        {
            "arch": arch,
            "blocks": blocks,
            "width": width,
            "num_outputs": outputs,
            "input_shape": [3, size, size],
        }
    )


@pytest.mark.parametrize("blocks", [2, 3, 4])
@pytest.mark.parametrize("size", [32, 64])
def test_resnet18_and_vgg_share_spatial_levels(blocks: int, size: int) -> None:
    res, vgg = rgb("resnet18", blocks, size=size), rgb("vgg", blocks, size=size)
    assert [s[1:] for s in res.level_shapes()] == [s[1:] for s in vgg.level_shapes()]
    assert res.level_shapes()[0] == (3, size, size) and len(res.level_shapes()[-1]) == 1
    # the ImageNet stem takes 64-pixel inputs down by 4 before the first residual stage
    first = res.level_shapes()[1][1]
    assert (
        first == {(2, 32): 8, (3, 32): 16, (4, 32): 32, (2, 64): 4, (3, 64): 8, (4, 64): 16}[(blocks, size)]
    )


@pytest.mark.parametrize("arch", ["resnet18", "vgg"])
def test_rgb_families_chain_and_every_parameter_learns(arch: str) -> None:
    model = rgb(arch, 4).train()
    x = torch.rand(4, 3, 32, 32)
    feats = x
    for b in range(model.num_blocks):
        feats = model.run_blocks(feats, b, b + 1)
        assert tuple(feats.shape[1:]) == model.level_shapes()[b + 1]
    model(x).logsumexp(1).mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def test_three_families_form_one_teacher_set_on_rgb() -> None:
    models = {"res": rgb("resnet18", 3), "vgg": rgb("vgg", 3), "lenet": rgb("lenet5", 3, width=1.0)}
    check_compatible(models)  # raises on a mismatch


def test_import_path_needs_the_module_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"arch": f"{HERE}:tiny_net", "num_outputs": 4, "input_shape": [3, 32, 32]}
    monkeypatch.delenv(ARCH_MODULES_ENV, raising=False)
    with pytest.raises(ConfigError) as err:
        build_model(spec)
    assert "was not allowed to import" in err.value.problem and ARCH_MODULES_ENV in err.value.fix
    # a sibling with a shared name prefix is not covered by the prefix
    monkeypatch.setenv(ARCH_MODULES_ENV, "tests.test_arch")
    with pytest.raises(ConfigError, match="not allowed"):
        build_model(spec)
    monkeypatch.setenv(ARCH_MODULES_ENV, "tests")
    model = build_model({**spec, "width": 0.5})
    assert model.num_outputs == 4 and model.level_shapes()[1] == (4, 16, 16)
    assert model.spec == {
        "arch": f"{HERE}:tiny_net",
        "width": 0.5,
        "input_shape": [3, 32, 32],
        "num_outputs": 4,
    }
    assert parse_arch(f"{HERE}:tiny_net:0.5:blocks=2") == {
        "arch": f"{HERE}:tiny_net",
        "width": 0.5,
        "blocks": 2,
    }


def test_a_bundle_of_an_external_factory_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ARCH_MODULES_ENV, "tests")
    model = build_model(
        {"arch": f"{HERE}:tiny_net", "num_outputs": 3, "input_shape": [3, 32, 32]},
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    save_bundle(model, tmp_path / "t", name="own", labels=["cat", "dog", "fox"], task="multiclass")
    loaded = load_bundle(tmp_path / "t")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model.eval()(x), model.eval()(x))
    # the same manifest on a machine that has not allowed the module: one clear error, nothing built
    monkeypatch.delenv(ARCH_MODULES_ENV)
    with pytest.raises(BundleError, match="not allowed to import"):
        load_bundle(tmp_path / "t")


@pytest.mark.parametrize(
    ("factory", "problem"),
    [
        ("raising_net", "RuntimeError: the factory is broken"),
        ("plain_module", "returned Linear, not a BlockClassifier"),
        ("ignores_outputs", "with 4 outputs, asked for (3, 32, 32) and 3"),
        ("HERE", "has no callable 'HERE'"),
        ("no_such_factory", "has no callable"),
    ],
)
def test_a_wrong_factory_is_one_clear_error(
    factory: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ARCH_MODULES_ENV, "tests")
    with pytest.raises(ConfigError) as err:
        build_model({"arch": f"{HERE}:{factory}", "num_outputs": 3, "input_shape": [3, 32, 32]})
    assert problem in err.value.problem and err.value.fix


def test_options_a_factory_does_not_take_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ARCH_MODULES_ENV, "tests")
    base = {"arch": f"{HERE}:tiny_net", "num_outputs": 3, "input_shape": [3, 32, 32]}
    with pytest.raises(ConfigError, match=r"no option\(s\) \['depth'\]"):
        build_model({**base, "depth": 2})
    with pytest.raises(ConfigError, match="JSON scalars"):
        build_model({**base, "width": 1.0, "Bad/Key": 1})


def test_a_module_that_fails_to_import_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "brokenpkg.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(ARCH_MODULES_ENV, "brokenpkg")
    with pytest.raises(ConfigError, match="cannot import module 'brokenpkg': ImportError: needs libfoo"):
        lookup("brokenpkg:build")


def test_an_installed_entry_point_is_an_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real distribution on sys.path (dist-info with entry_points.txt), found by importlib.metadata."""
    pkg = tmp_path / "acme_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from tests.test_architectures import tiny_net

            def build(num_outputs, *, input_shape, mean, std, blocks=3):
                return tiny_net(num_outputs, input_shape=input_shape, mean=mean, std=std, width=2.0, blocks=blocks)
            """
        )
    )
    info = tmp_path / "acme_models-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nacmenet = acme_models:build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ARCH_MODULES_ENV, raising=False)  # entry points need no allow-list: they are installed
    assert "acmenet" in available()
    model = build_model({"arch": "acmenet", "blocks": 2, "num_outputs": 2, "input_shape": [3, 32, 32]})
    assert model.num_blocks == 2 and model.level_shapes()[1] == (16, 16, 16)
    assert model.spec["arch"] == "acmenet"
    with pytest.raises(ConfigError, match="no option"):
        parse_arch("acmenet:width=2")
    sys.modules.pop("acme_models", None)
