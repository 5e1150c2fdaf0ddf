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


#: Sane ranges for the spec fields every constructor takes: a manifest is user input, and an absurd
#: width would try to allocate petabytes before anything could say why.
LIMITS: dict[str, tuple[type, float, float]] = {
    "width": (float, 1e-3, 16.0),
    "blocks": (int, 1, 16),
    "depth": (int, 1, 16),
    "num_outputs": (int, 1, 100_000),
}
MAX_SIDE, MAX_CHANNELS = 4096, 64


def check_spec(spec: dict[str, Any]) -> None:
    """Types and ranges of an architecture spec's fields, before anything is built."""
    for key, (kind, low, high) in LIMITS.items():
        if key not in spec:
            continue
        value = spec[key]
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok_type = ok_type and float(value).is_integer()
        if not ok_type or not (low <= value <= high):
            raise ConfigError(
                f"architecture field {key}={value!r} is not {'an integer' if kind is int else 'a number'} "
                f"in [{low:g}, {high:g}]",
                "check the architecture options (a teacher.json written by save_bundle has valid ones)",
            )
    shape = spec.get("input_shape")
    if shape is not None:
        valid = (
            isinstance(shape, (list, tuple))
            and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
        )
        if not valid or shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_SIDE:
            raise ConfigError(
                f"architecture input_shape {shape!r} is not [C, H, W] with 1 <= C <= {MAX_CHANNELS} "
                f"and sides up to {MAX_SIDE}",
                "check the architecture options",
            )


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
    check_spec(spec)
    kwargs = {k: spec[k] for k in _OPTIONS[name] if k in spec}
    try:
        return _REGISTRY[name](
            int(spec["num_outputs"]), input_shape=tuple(spec["input_shape"]), mean=mean, std=std, **kwargs
        )
    except (ValueError, KeyError, TypeError) as err:
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
