"""Architecture registry: names to constructors, so bundles and configs can rebuild any model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dfka.errors import ConfigError
from dfka.models.base import BlockClassifier
from dfka.models.lenet import lenet5
from dfka.models.resnet import resnet

Constructor = Callable[..., BlockClassifier]

_REGISTRY: dict[str, Constructor] = {}
#: Spec keys each constructor understands besides num_outputs/input_shape.
_OPTIONS: dict[str, tuple[str, ...]] = {}


def register(name: str, constructor: Constructor, options: Sequence[str] = ("width", "blocks")) -> None:
    _REGISTRY[name] = constructor
    _OPTIONS[name] = tuple(options)


register("lenet5", lenet5)
register("resnet", resnet, ("width", "blocks", "depth"))


def available() -> list[str]:
    return sorted(_REGISTRY)


def build_model(
    spec: dict[str, Any], *, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)
) -> BlockClassifier:
    """Rebuild a model from its ``spec`` (as stored in ``BlockClassifier.spec`` and bundle manifests)."""
    name = spec.get("arch")
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown architecture {name!r}",
            f"use one of {', '.join(available())} (see dfka.models.registry)",
        )
    unknown = set(spec) - {"arch", "num_outputs", "input_shape", *_OPTIONS[name]}
    if unknown:
        raise ConfigError(
            f"architecture {name!r} has no option(s) {sorted(unknown)}", f"valid: {_OPTIONS[name]}"
        )
    kwargs = {k: spec[k] for k in _OPTIONS[name] if k in spec}
    try:
        return _REGISTRY[name](
            int(spec["num_outputs"]), input_shape=tuple(spec["input_shape"]), mean=mean, std=std, **kwargs
        )
    except (ValueError, KeyError) as err:
        raise ConfigError(
            f"cannot build {name} from {spec}: {err}", "check the architecture options"
        ) from None


def parse_arch(text: str, **defaults: Any) -> dict[str, Any]:
    """``"lenet5:0.5"`` or ``"resnet:1.0:blocks=3"`` → a partial spec (arch, width, extra options)."""
    name, *rest = text.split(":")
    spec: dict[str, Any] = {"arch": name, **defaults}
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture {name!r}", f"use one of {', '.join(available())}")
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "width", part
        if key not in _OPTIONS[name]:
            raise ConfigError(f"architecture {name!r} has no option {key!r}", f"valid: {_OPTIONS[name]}")
        try:
            spec[key] = float(value) if key == "width" else int(value)
        except ValueError:
            raise ConfigError(
                f"bad value {value!r} for {key} in {text!r}", "e.g. lenet5:0.5 or resnet:1:blocks=3"
            ) from None
    return spec
