"""Architecture registry: names to constructors, so bundles and configs can rebuild any model.

An architecture is named in one of three ways (the ``arch`` field of a spec or a manifest):

- a built-in name: ``lenet5``, ``resnet`` (small, 28x28), ``resnet18`` and ``vgg`` (RGB, 32x32 and up);
- an installed entry point in the ``dfka.architectures`` group, e.g. in a package's ``pyproject.toml``
  ``[project.entry-points."dfka.architectures"] mynet = "mypkg.models:build"``, then ``arch: mynet``;
- an import path ``module:factory`` (``mypkg.models:build``), accepted only for modules the user names
  in ``DFKA_ARCH_MODULES`` (comma-separated module prefixes): a manifest is user input, and naming a
  module must not be enough to make dfka import it.

A factory is called as ``factory(num_outputs, input_shape=(C, H, W), mean=[...], std=[...], **options)``
and must return a :class:`~dfka.models.base.BlockClassifier` (B blocks, a head, the per-level shapes).
Its options are its other keyword parameters; their values are JSON scalars. Only code the user
installed or allowed ever runs; weights still come from safetensors, never from pickles.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from dfka.errors import ConfigError
from dfka.models.base import BlockClassifier
from dfka.models.lenet import lenet5
from dfka.models.resnet import resnet
from dfka.models.resnet18 import resnet18
from dfka.models.vgg import vgg
from dfka.settings import ARCH_MODULES_ENV

Constructor = Callable[..., BlockClassifier]
ENTRY_POINT_GROUP = "dfka.architectures"
#: Keys every spec may carry besides the constructor's options.
SPEC_KEYS = ("arch", "num_outputs", "input_shape")
#: The factory parameters dfka fills itself; the rest of the signature are the options.
_FILLED = ("num_outputs", "input_shape", "mean", "std")
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_OPTION_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")
_MAX_OPTIONS, _MAX_STR = 16, 64


@dataclass(frozen=True)
class Architecture:
    name: str
    constructor: Constructor
    #: option names; None: the factory takes ``**kwargs``, so any safe name is passed on.
    options: tuple[str, ...] | None
    builtin: bool = False


_REGISTRY: dict[str, Architecture] = {}
#: Factories resolved by import path; the allow-list is checked on every lookup, the import done once.
_IMPORTED: dict[str, Architecture] = {}


def register(name: str, constructor: Constructor, options: Sequence[str] | None = None) -> None:
    """Register a constructor under ``name``; ``options`` default to its keyword parameters."""
    _REGISTRY[name] = Architecture(name, constructor, _options_of(constructor, options))


def _options_of(constructor: Constructor, options: Sequence[str] | None) -> tuple[str, ...] | None:
    if options is not None:
        return tuple(options)
    try:
        params = inspect.signature(constructor).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds and p.name not in _FILLED)


for _name, _ctor, _opts in (
    ("lenet5", lenet5, ("width", "blocks")),
    ("resnet", resnet, ("width", "blocks", "depth")),
    ("resnet18", resnet18, ("width", "blocks")),
    ("vgg", vgg, ("width", "blocks")),
):
    _REGISTRY[_name] = Architecture(_name, _ctor, _opts, builtin=True)


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
    extra = {k: v for k, v in spec.items() if k not in (*SPEC_KEYS, *LIMITS)}
    if len(extra) > _MAX_OPTIONS:
        raise ConfigError(f"architecture spec has {len(extra)} options", f"at most {_MAX_OPTIONS}")
    for key, value in extra.items():
        scalar = isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= _MAX_STR)
        if not _OPTION_NAME.match(str(key)) or not scalar:
            raise ConfigError(
                f"architecture option {key!r}={value!r} is not a lower-case name with a number, "
                f"true/false or a short string (at most {_MAX_STR} characters)",
                "factory options are JSON scalars, e.g. depth=2 or norm=batch",
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
    """Built-in and registered names plus the installed ``dfka.architectures`` entry points."""
    return sorted({*_REGISTRY, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def allowed_modules() -> list[str]:
    """Module prefixes whose factories may be named by import path (``DFKA_ARCH_MODULES``)."""
    return [m.strip() for m in os.environ.get(ARCH_MODULES_ENV, "").split(",") if m.strip()]


def _allowed(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in allowed_modules())


def lookup(name: Any) -> Architecture:
    """The architecture ``name`` refers to; a ConfigError that names the fix otherwise."""
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"architecture name {name!r} is not a string", f"use one of {', '.join(available())}"
        )
    if name in _REGISTRY:
        return _REGISTRY[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        factory = _call_guarded(ep.load, f"entry point {name!r} ({ep.value})")
        _REGISTRY[name] = _architecture(name, factory, f"entry point {name!r} ({ep.value})")
        return _REGISTRY[name]
    if _IMPORT_PATH.match(name):
        module, _, attr = name.partition(":")
        if not _allowed(module):
            raise ConfigError(
                f"architecture {name!r} is an import path in a module dfka was not allowed to import",
                f"if you trust {module.split('.')[0]!r}, set {ARCH_MODULES_ENV}={module.split('.')[0]} "
                f"(comma-separated module prefixes), or install its factory as a {ENTRY_POINT_GROUP!r} "
                "entry point",
            )
        if name not in _IMPORTED:
            mod = _call_guarded(lambda: importlib.import_module(module), f"module {module!r}")
            factory = getattr(mod, attr, None)
            if not callable(factory):
                raise ConfigError(
                    f"{module!r} has no callable {attr!r}", f"name a factory function, e.g. {module}:build"
                )
            _IMPORTED[name] = _architecture(name, factory, name)
        return _IMPORTED[name]
    raise ConfigError(
        f"unknown architecture {name!r}",
        f"use one of {', '.join(available())}, an installed {ENTRY_POINT_GROUP!r} entry point, or an "
        f"import path module:factory whose module is listed in {ARCH_MODULES_ENV}",
    )


def _architecture(name: str, factory: Any, what: str) -> Architecture:
    if not callable(factory):
        raise ConfigError(f"{what} is not callable", "point it at a factory function")
    return Architecture(name, factory, _options_of(factory, None))


def _call_guarded(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except Exception as err:  # user code: any failure becomes one clear line
        raise ConfigError(
            f"cannot import {what}: {type(err).__name__}: {err}",
            "check that the package is installed in this environment and imports cleanly",
        ) from None


def accepts(name: str, option: str) -> bool:
    """Whether architecture ``name`` takes ``option`` (e.g. ``blocks``)."""
    options = lookup(name).options
    return options is None or option in options


def build_model(
    spec: dict[str, Any], *, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)
) -> BlockClassifier:
    """Rebuild a model from its ``spec`` (as stored in ``BlockClassifier.spec`` and bundle manifests)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"architecture spec {spec!r} is not a mapping", "e.g. {arch: lenet5, width: 1}")
    arch = lookup(spec.get("arch"))
    check_spec(spec)
    given = [k for k in spec if k not in SPEC_KEYS]
    unknown = sorted(set(given) - set(arch.options)) if arch.options is not None else []
    if unknown:
        raise ConfigError(f"architecture {arch.name!r} has no option(s) {unknown}", f"valid: {arch.options}")
    if "num_outputs" not in spec or "input_shape" not in spec:
        raise ConfigError(
            f"architecture spec {spec} lacks num_outputs or input_shape", "regenerate the bundle"
        )
    kwargs = {k: spec[k] for k in given}
    shape = tuple(spec["input_shape"])
    try:
        model = arch.constructor(int(spec["num_outputs"]), input_shape=shape, mean=mean, std=std, **kwargs)
    except Exception as err:  # built-in constructors raise ValueError; a user factory may raise anything
        raise ConfigError(
            f"cannot build {arch.name} from {spec}: {type(err).__name__}: {err}",
            "check the architecture options (and, for your own factory, that it builds with them)",
        ) from None
    if not isinstance(model, BlockClassifier):
        raise ConfigError(
            f"architecture {arch.name!r} returned {type(model).__name__}, not a BlockClassifier",
            "wrap the network's stages in dfka.models.BlockClassifier(blocks, head, spec=..., input_shape=...)",
        )
    if model.input_shape != shape or model.num_outputs != int(spec["num_outputs"]):
        raise ConfigError(
            f"architecture {arch.name!r} built a model for input {model.input_shape} with "
            f"{model.num_outputs} outputs, asked for {shape} and {spec['num_outputs']}",
            "the factory must honour its num_outputs and input_shape arguments",
        )
    if not arch.builtin:  # what the registry can rebuild it from, whatever the factory wrote
        model.spec = {
            "arch": arch.name,
            **kwargs,
            "input_shape": list(shape),
            "num_outputs": model.num_outputs,
        }
    return model


def _option_value(key: str, value: str) -> Any:
    if key in ("blocks", "depth"):
        return int(value)
    if key == "width":
        return float(value)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_arch(text: str, **defaults: Any) -> dict[str, Any]:
    """``"lenet5:0.5"``, ``"resnet:1.0:blocks=3"`` or ``"mypkg.models:build:depth=2"`` → a partial spec
    (arch, width, extra options)."""
    parts = str(text).split(":")
    # a registry name is followed by a width or key=value; an import path's second part is the factory
    n = 2 if len(parts) > 1 and parts[0] not in available() and parts[1].isidentifier() else 1
    name, rest = ":".join(parts[:n]), parts[n:]
    arch = lookup(name)
    spec: dict[str, Any] = {"arch": name, **defaults}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "width", part
        if arch.options is not None and key not in arch.options:
            raise ConfigError(f"architecture {name!r} has no option {key!r}", f"valid: {arch.options}")
        try:
            spec[key] = _option_value(key, value)
        except ValueError:
            raise ConfigError(
                f"bad value {value!r} for {key} in {text!r}", "e.g. lenet5:0.5 or resnet:1:blocks=3"
            ) from None
    return spec
