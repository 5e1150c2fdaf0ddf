"""Teacher bundles: ``weights.safetensors`` plus a ``teacher.json`` manifest. Nothing is ever unpickled.

A bundle is the only way a teacher enters dfka. Loading one

1. reads the manifest (size-capped JSON, validated by a strict schema),
2. checks the weights file size and sha256 against the manifest,
3. rebuilds the architecture from the registry,
4. checks that every tensor's name and shape match the rebuilt model, and that no weight is NaN or Inf.

Each failure is a :class:`~dfka.errors.BundleError` that says what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfka import __version__
from dfka.errors import BundleError, ConfigError, describe_validation
from dfka.models import BlockClassifier, build_model

FORMAT_VERSION = "dfka.teacher/v1"
MANIFEST_NAME = "teacher.json"
WEIGHTS_NAME = "weights.safetensors"
MAX_MANIFEST_BYTES = 1 << 20
#: Teacher names become module keys, metric names and path parts: letters, digits, '_' and '-'.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
#: Label names too: they become metric names, folder names of a test set and the ``A..B`` range syntax.
SAFE_LABEL = SAFE_NAME
MAX_WEIGHTS_BYTES = 4 << 30
#: File name endings that mean "a pickle": refused with an explanation, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")

Task = Literal["multiclass", "multilabel"]


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    shape: list[int] = Field(min_length=3, max_length=3)
    pixel_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(s <= 0 for s in v):
            raise ValueError("input shape entries must be positive")
        return v

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: list[float]) -> list[float]:
        if any(not (s > 0 and math.isfinite(s)) for s in v):
            raise ValueError("std entries must be positive and finite")
        return v


class WeightsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    file: str = WEIGHTS_NAME
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)


class TeacherManifest(BaseModel):
    """The ``teacher.json`` schema. Unknown keys are rejected so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: Literal["dfka.teacher/v1"] = FORMAT_VERSION
    name: str = Field(min_length=1, pattern=SAFE_NAME)
    arch: dict[str, Any]
    block_count: int = Field(ge=1)
    level_shapes: list[list[int]]
    input: InputSpec
    labels: list[str] = Field(min_length=1)
    task: Task
    metrics: dict[str, float] = Field(default_factory=dict)
    weights: WeightsSpec
    training: dict[str, Any] = Field(default_factory=dict)
    created_by: str = f"dfka {__version__}"

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if not re.match(SAFE_LABEL, x)]
        if bad:
            raise ValueError(
                f"label names {bad[:5]} are not safe names (letters, digits, '_' and '-', at most 64, "
                "starting with a letter or digit; they become metric names and folder names)"
            )
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicate label names {dupes}")
        return v


@dataclass
class TeacherBundle:
    """A loaded teacher: its manifest and its frozen-ready model."""

    manifest: TeacherManifest
    model: BlockClassifier
    source: str

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def task(self) -> Task:
        return self.manifest.task


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(
    model: BlockClassifier,
    out: str | Path,
    *,
    name: str,
    labels: Sequence[str],
    task: Task,
    metrics: dict[str, float] | None = None,
    training: dict[str, Any] | None = None,
) -> TeacherManifest:
    """Write ``out/weights.safetensors`` and ``out/teacher.json``; ``out`` may be ``s3://bucket/prefix``.

    The weights are written first and the manifest last, so a reader never sees a manifest that points
    at missing weights.
    """
    from dfka import storage

    if len(labels) != model.num_outputs:
        raise BundleError(f"{len(labels)} label names for a model with {model.num_outputs} outputs")
    unsafe = [label for label in labels if not isinstance(label, str) or not re.match(SAFE_LABEL, label)]
    if unsafe or not re.match(SAFE_NAME, str(name)):
        raise BundleError(
            f"unsafe {'label names ' + repr(unsafe[:5]) if unsafe else 'teacher name ' + repr(name)}",
            "use letters, digits, '_' and '-' (at most 64, starting with a letter or digit), e.g. golden_retriever",
        )
    with tempfile.TemporaryDirectory(prefix="dfka-bundle-") as tmp:
        local = Path(tmp)
        weights = local / WEIGHTS_NAME
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(weights), metadata={"format": FORMAT_VERSION})
        manifest = TeacherManifest(
            name=name,
            arch=dict(model.spec),
            block_count=model.num_blocks,
            level_shapes=[list(s) for s in model.level_shapes()],
            input=InputSpec(shape=list(model.input_shape), **model.normalization),
            labels=list(labels),
            task=task,
            metrics=dict(metrics or {}),
            weights=WeightsSpec(sha256=sha256_file(weights), bytes=weights.stat().st_size),
            training=dict(training or {}),
        )
        (local / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        storage.put_file(weights, storage.join(str(out), WEIGHTS_NAME))
        storage.put_file(local / MANIFEST_NAME, storage.join(str(out), MANIFEST_NAME))
    return manifest


def load_bundle(uri: str | Path, *, cache_dir: Path | None = None) -> TeacherBundle:
    """Load and verify a bundle from a directory, a ``teacher.json`` path, or ``s3://bucket/prefix``."""
    from dfka import storage

    text = str(uri)
    if text.lower().endswith(PICKLE_SUFFIXES):
        raise BundleError(
            f"{text} looks like a pickled PyTorch checkpoint; dfka never unpickles files it is given",
            "in an environment that trusts that file, export a bundle: build the model with dfka.models, "
            "load the state dict, and call dfka.bundles.save_bundle (writes weights.safetensors + teacher.json)",
        )
    if text.endswith(MANIFEST_NAME):
        text = text[: -len(MANIFEST_NAME)].rstrip("/") or "."
    if storage.is_s3(text):
        target = Path(cache_dir or tempfile.mkdtemp(prefix="dfka-teacher-"))
        for key in (MANIFEST_NAME, WEIGHTS_NAME):
            if not storage.exists(storage.join(text, key)):
                raise BundleError(f"{storage.join(text, key)} does not exist", _bundle_fix(text))
            storage.get_file(storage.join(text, key), target / key)
        local = target
    else:
        local = Path(text)
    return _load_local(local, source=str(uri))


def _bundle_fix(where: str) -> str:
    return (
        f"{where} must hold {MANIFEST_NAME} and {WEIGHTS_NAME}; "
        "create one with `dfka teachers train ... --out DIR` or dfka.bundles.save_bundle"
    )


def _load_local(path: Path, source: str) -> TeacherBundle:
    if not path.is_dir():
        raise BundleError(f"teacher bundle {source} not found", _bundle_fix(source))
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
        hint = f" (found {pickles}: dfka never unpickles)" if pickles else ""
        raise BundleError(f"{source} has no {MANIFEST_NAME}{hint}", _bundle_fix(source))
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{manifest_path} is larger than {MAX_MANIFEST_BYTES} bytes", "is this really a manifest?"
        )
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err})", "regenerate the bundle") from None
    except RecursionError:
        raise BundleError(
            f"{manifest_path} is nested too deeply to be a teacher manifest", "regenerate the bundle"
        ) from None
    if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT_VERSION):
        raise BundleError(
            f"{manifest_path} has format {raw.get('format')!r}; this dfka reads {FORMAT_VERSION!r}",
            "re-export the bundle with this dfka version",
        )
    try:
        manifest = TeacherManifest.model_validate(raw)
    except ValidationError as err:
        problems = describe_validation(err, "manifest")
        raise BundleError(
            f"{manifest_path} is invalid: {problems}", "fix the manifest or regenerate the bundle"
        ) from None

    weights_path = path / manifest.weights.file
    if manifest.weights.file != WEIGHTS_NAME or not weights_path.is_file():
        raise BundleError(f"{source} has no {WEIGHTS_NAME}", _bundle_fix(source))
    size = weights_path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise BundleError(f"{weights_path} is {size} bytes, over the {MAX_WEIGHTS_BYTES}-byte limit")
    if size != manifest.weights.bytes:
        raise BundleError(
            f"{weights_path} is {size} bytes but the manifest says {manifest.weights.bytes} (truncated or replaced)",
            "re-copy the bundle; if the weights were changed on purpose, regenerate the manifest with save_bundle",
        )
    actual = sha256_file(weights_path)
    if actual != manifest.weights.sha256:
        raise BundleError(
            f"{weights_path} sha256 {actual[:12]}… does not match the manifest's {manifest.weights.sha256[:12]}…",
            "the weights were modified or corrupted; re-copy the bundle from its source",
        )

    try:
        model = build_model(manifest.arch, mean=manifest.input.mean, std=manifest.input.std)
    except ConfigError as err:
        raise BundleError(f"{source}: {err.problem}", err.fix) from None
    if list(model.input_shape) != manifest.input.shape:
        raise BundleError(
            f"{source}: manifest input shape {manifest.input.shape} != architecture {model.input_shape}"
        )
    if [
        list(s) for s in model.level_shapes()
    ] != manifest.level_shapes or model.num_blocks != manifest.block_count:
        raise BundleError(
            f"{source}: manifest level shapes {manifest.level_shapes} do not match the architecture's "
            f"{[list(s) for s in model.level_shapes()]}",
            "the manifest and the weights come from different models; regenerate the bundle",
        )
    if len(manifest.labels) != model.num_outputs:
        raise BundleError(f"{source}: {len(manifest.labels)} labels for {model.num_outputs} outputs")

    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(
            f"{weights_path} is not a readable safetensors file ({err})", "re-copy the bundle"
        ) from None
    _check_state(model, state, source, manifest.arch.get("arch"))
    model.load_state_dict(state, strict=True)
    model.eval()
    return TeacherBundle(manifest=manifest, model=model, source=source)


def _check_state(
    model: BlockClassifier, state: dict[str, torch.Tensor], source: str, arch: Any = None
) -> None:
    """Every tensor named and shaped as the model expects, finite, with non-negative BN variances."""
    arch = arch if arch is not None else model.spec.get("arch")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"{source}: weights do not match architecture {arch} "
            f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]})",
            "check the manifest's arch options (width, blocks) against the model that produced the weights",
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BundleError(
                f"{source}: tensor {key} has shape {tuple(tensor.shape)}, architecture expects "
                f"{tuple(expected[key].shape)}",
                "the manifest's arch options do not match the weights",
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise BundleError(
                f"{source}: tensor {key} contains NaN or Inf", "the teacher diverged; retrain or re-export it"
            )
        if key.endswith("running_var") and (tensor < 0).any():
            raise BundleError(
                f"{source}: BatchNorm {key} has negative running variances (a variance cannot be negative)",
                "the weights were damaged or hand-edited; re-export the teacher",
            )


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file, or, with ``trust_pickle``, from a PyTorch ``.pt``/``.pth``
    file the user vouches for (``torch.load(weights_only=True)``: tensors and containers only). This is
    the one place dfka reads a pickle, and only when its own user asks on the command line."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"state dict {path} not found", "pass the file the weights were saved to")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise BundleError(f"{path} is over the {MAX_WEIGHTS_BYTES}-byte limit")
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        if not trust_pickle:
            raise BundleError(
                f"{path} is a pickled PyTorch file; dfka does not unpickle files it is not told to trust",
                "if you made it yourself, pass --trust-pickle (read with torch.load(weights_only=True)), "
                "or save it with safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')",
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many kinds on a bad or hostile file
            raise BundleError(
                f"{path} is not a plain state dict ({type(err).__name__}: {str(err)[:200]})",
                "save model.state_dict() (not the model object) and try again",
            ) from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]  # the common {"state_dict": ...} checkpoint layout
    else:
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise BundleError(f"{path} is not a readable safetensors file ({err})", "re-export it") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise BundleError(f"{path} does not hold a mapping of names to tensors", "save model.state_dict()")
    return state


def pack_bundle(
    spec: dict[str, Any],
    state: dict[str, torch.Tensor],
    out: str | Path,
    *,
    name: str,
    labels: Sequence[str],
    task: Task,
    mean: Sequence[float],
    std: Sequence[float],
    metrics: dict[str, float] | None = None,
) -> TeacherBundle:
    """Build ``spec`` (a registry name, entry point or allowed import path), load ``state`` into it with
    every check :func:`load_bundle` makes, write the bundle to ``out`` and load it back verified."""
    if len(labels) != int(spec.get("num_outputs", len(labels))):
        raise BundleError(f"{len(labels)} label names for an architecture with {spec['num_outputs']} outputs")
    try:
        model = build_model({**spec, "num_outputs": len(labels)}, mean=mean, std=std)
    except ConfigError as err:
        raise BundleError(err.problem, err.fix) from None
    _check_state(model, state, f"state dict for {spec.get('arch')}")
    model.load_state_dict(state, strict=True)
    save_bundle(
        model,
        out,
        name=name,
        labels=labels,
        task=task,
        metrics=metrics,
        training={"packed_by": "dfka teachers pack"},
    )
    return load_bundle(out)
