"""Stage outputs on disk or in the object store: safetensors for tensors, JSON for everything else.

Each artifact is a folder (``<name>.safetensors`` + ``<name>.json``, manifest written last) so that a
pipeline stage can hand it to the next one through any S3 store. Nothing is pickled.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dfka.amalgamation.config import GanConfig
from dfka.amalgamation.stage1 import AmalgamatingGAN
from dfka.amalgamation.stage2 import DualGenerator
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule
from dfka.bundles import sha256_file
from dfka.errors import BundleError
from dfka.models import build_model


def save_tensors(state: dict[str, torch.Tensor], meta: dict[str, Any], out: str, name: str) -> None:
    """Write ``out/<name>.safetensors`` then ``out/<name>.json`` (with the weights' sha256)."""
    from dfka import storage

    with tempfile.TemporaryDirectory(prefix="dfka-artifact-") as tmp:
        weights = Path(tmp) / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(weights))
        manifest = {**meta, "sha256": sha256_file(weights)}
        storage.put_file(weights, storage.join(out, weights.name))
        storage.put_bytes(json.dumps(manifest, indent=2).encode(), storage.join(out, f"{name}.json"))


def load_tensors(uri: str, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from dfka import storage

    manifest_key = storage.join(uri, f"{name}.json")
    if not storage.exists(manifest_key):
        raise BundleError(
            f"{manifest_key} does not exist", f"point at the output folder of the stage that writes {name}"
        )
    meta = json.loads(storage.get_bytes(manifest_key))
    with tempfile.TemporaryDirectory(prefix="dfka-artifact-") as tmp:
        weights = Path(tmp) / f"{name}.safetensors"
        storage.get_file(storage.join(uri, weights.name), weights)
        if sha256_file(weights) != meta.get("sha256"):
            raise BundleError(
                f"{uri}/{weights.name} does not match its manifest's sha256", "re-run the stage"
            )
        return load_file(str(weights)), meta


def save_gan(gan: AmalgamatingGAN, out: str, extra: dict[str, Any] | None = None) -> None:
    state = {f"generator.{k}": v for k, v in gan.generator.state_dict().items()}
    state |= {f"filters.{k}": v for k, v in gan.filters.state_dict().items()}
    meta = {
        "format": "dfka.gan/v1",
        "gan": json.loads(gan.cfg.model_dump_json()),
        "teachers": gan.teachers.names,
        "levels": [list(s) for s in gan.generator_level_shapes()],
        **(extra or {}),
    }
    save_tensors(state, meta, out, "gan")


def gan_report(uri: str) -> dict[str, Any]:
    """The stage-1 report saved with the generator (``seconds``, ``steps``, ...), without its weights."""
    from dfka import storage

    meta = json.loads(storage.get_bytes(storage.join(uri, "gan.json")))
    return dict(meta.get("report") or {"seconds": 0.0})


def load_gan(uri: str, teachers: TeacherSet, union: UnionRule) -> AmalgamatingGAN:
    state, meta = load_tensors(uri, "gan")
    if meta.get("teachers") != teachers.names:
        raise BundleError(
            f"the generator at {uri} was trained for teachers {meta.get('teachers')}, not {teachers.names}",
            "use the GAN stage output of the same run",
        )
    gan = AmalgamatingGAN(teachers, union, GanConfig.model_validate(meta["gan"]))
    gan.generator.load_state_dict(
        {k.removeprefix("generator."): v for k, v in state.items() if k.startswith("generator.")}
    )
    gan.filters.load_state_dict(
        {k.removeprefix("filters."): v for k, v in state.items() if k.startswith("filters.")}
    )
    return gan.eval()


def save_dual(
    dual: DualGenerator, out: str, generator_channels: dict[int, int], extra: dict[str, Any] | None = None
) -> None:
    state = {k: v for k, v in dual.state_dict().items() if not k.startswith("teachers.")}
    student = dual.student
    meta = {
        "format": "dfka.dual/v1",
        "student": student.spec,
        "normalization": student.normalization,
        "teachers": dual.teachers.names,
        "generator_channels": {str(k): v for k, v in generator_channels.items()},
        **(extra or {}),
    }
    save_tensors(state, meta, out, "dual")


def load_dual(uri: str, teachers: TeacherSet) -> tuple[DualGenerator, dict[str, Any]]:
    state, meta = load_tensors(uri, "dual")
    if meta.get("teachers") != teachers.names:
        raise BundleError(
            f"the dual generator at {uri} was trained for teachers {meta.get('teachers')}, not {teachers.names}",
            "use the block-training stage output of the same run",
        )
    student = build_model(meta["student"], **meta["normalization"])
    dual = DualGenerator(student, teachers, {int(k): v for k, v in meta["generator_channels"].items()})
    missing, unexpected = dual.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("teachers.") for k in missing):
        raise BundleError(
            f"{uri}: dual generator weights do not match its manifest", "re-run the block-training stage"
        )
    return dual.eval(), meta
