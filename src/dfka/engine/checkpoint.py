"""Checkpoints of the training stages: tensors in safetensors, structure in JSON, never a pickle.

A checkpoint holds the ``state_dict()`` of each stateful object a stage names (trainer: model,
optimiser and RNG; trajectory reservoir; sample-batch stream), the process RNG states (torch, CUDA,
NumPy, Python), the loop position (phase, block, step, loop seconds) and the config hash. Layout under
a stage's checkpoint prefix (``s3://<bucket>/runs/<run-id>/<stage>/checkpoints/``, else
``<out>/checkpoints/``)::

    ckpt-000007/state.safetensors    written first: every tensor, RNG states as uint8/int64 tensors
    ckpt-000007/checkpoint.json      written last: format, stage, config hash, position, structure, sha256

A checkpoint exists once its manifest does. Older checkpoints are deleted only after a newer one is
complete (the newest ``keep`` stay), so a process or object store that dies mid-write leaves the last
good checkpoint in place. On restore the newest complete checkpoint is verified (sha256) and loaded;
one that fails verification is skipped for the one before it. A checkpoint written for another config
is refused with :class:`~dfka.errors.CheckpointError` (a run id belongs to one config); one written for
the same config but other inputs (an upstream stage re-ran under the same run id) is ignored with a
warning, and the stage starts afresh.

Determinism: on CPU with a step budget, a stage killed after checkpoint ``k`` and restarted ends with
bit-identical weights to an uninterrupted run (``tests/test_resume.py``). A time budget resumes with the
remaining loop time, which is not bit-identical (the step count depends on the machine's speed).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfka import storage
from dfka.bundles import sha256_file
from dfka.engine import distributed as dist
from dfka.errors import CheckpointError, ConfigError, StorageError
from dfka.settings import CHECKPOINT_EVERY_ENV, DEFAULT_CHECKPOINT_EVERY

log = logging.getLogger(__name__)

FORMAT = "dfka.engine.checkpoint/v1"
MANIFEST = "checkpoint.json"
TENSORS = "state.safetensors"
#: Steps between checkpoints of a training stage (``0``: only at the end of each block/phase).
EVERY_ENV, DEFAULT_EVERY = CHECKPOINT_EVERY_ENV, DEFAULT_CHECKPOINT_EVERY
#: ``1`` keeps a stage's checkpoints after it succeeds (default: they are deleted).
KEEP_ENV = "DFKA_KEEP_CHECKPOINTS"
_NAME = re.compile(r"^ckpt-(\d{6,})/(checkpoint\.json|state\.safetensors)$")
_RNG = "$rng"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Position:
    """Where the training loop was: ``step`` steps of ``phase`` (block ``block``) done in ``seconds``."""

    phase: str
    step: int
    block: int = 0
    done: bool = False
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


def every_from_env() -> int:
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY
    try:
        every = int(raw)
    except ValueError:
        every = -1
    if every < 0:
        raise ConfigError(
            f"{EVERY_ENV}={raw!r} is not a step count",
            f"set it to a whole number of steps >= 0 (0: checkpoint only at the end of each block), "
            f"or unset it for the default {DEFAULT_EVERY}",
        )
    return every


# ---------------------------------------------------------------- nested state <-> (JSON, tensors)


def pack(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """A JSON document for ``obj`` with every tensor moved into ``tensors`` (keyed by its path)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"$tensor": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj)
        return {"$ndarray": path, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: pack(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"$map": [[k, pack(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [pack(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path}")


def unpack(doc: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(doc, dict):
        if "$tensor" in doc:
            return tensors[doc["$tensor"]]
        if "$ndarray" in doc:
            return tensors[doc["$ndarray"]].numpy().astype(doc["dtype"])
        if "$tuple" in doc:
            return tuple(unpack(v, tensors) for v in doc["$tuple"])
        if "$map" in doc:
            return {k: unpack(v, tensors) for k, v in doc["$map"]}
        return {k: unpack(v, tensors) for k, v in doc.items()}
    if isinstance(doc, list):
        return [unpack(v, tensors) for v in doc]
    return doc


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t.contiguous()
    return out


# ---------------------------------------------------------------- the store


@dataclass
class _Loaded:
    number: int
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class Checkpoints:
    """The checkpoints of one stage of one run.

    ``inputs`` identifies what the stage trains on besides the config (e.g. the exported samples);
    a checkpoint is only resumed for the same ``config_hash`` and ``inputs``. ``every`` is the step
    interval the training loops use (see :func:`hook`).
    """

    def __init__(
        self,
        uri: str,
        *,
        stage: str,
        config_hash: str,
        inputs: Mapping[str, Any] | None = None,
        every: int | None = None,
        keep: int = 2,
    ):
        self.uri = uri
        self.stage = stage
        self.config_hash = config_hash
        self.inputs = json.loads(json.dumps(dict(inputs or {}), sort_keys=True))
        self.every = every_from_env() if every is None else every
        self.keep = max(1, keep)
        self.saved = 0
        self.resumed_from: Position | None = None
        self.last: Position | None = None
        self._last_uri: str | None = None

    # ------------------------------------------------------------ listing

    def _scan(self) -> dict[int, bool]:
        """Checkpoint number -> complete (has its manifest)."""
        found: dict[int, bool] = {}
        for rel in storage.listdir(self.uri):
            if m := _NAME.match(rel):
                n = int(m.group(1))
                found[n] = found.get(n, False) or m.group(2) == MANIFEST
        return found

    def _prefix(self, number: int) -> str:
        return storage.join(self.uri, f"ckpt-{number:06d}")

    # ------------------------------------------------------------ writing

    def save(self, objects: Mapping[str, Stateful], position: Position) -> str:
        """Write a new checkpoint (tensors first, manifest last), then delete the ones it supersedes.

        With several ranks only rank 0 writes (every rank holds the same state); the others return ""."""
        if not dist.process().main:
            return ""
        started = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        structure = {name: pack(obj.state_dict(), tensors, name) for name, obj in objects.items()}
        structure[_RNG] = pack(rng_state(), tensors, _RNG)
        try:
            existing = self._scan()
            number = max(existing, default=0) + 1
            prefix = self._prefix(number)
            with tempfile.TemporaryDirectory(prefix="dfka-ckpt-") as tmp:
                path = Path(tmp) / TENSORS
                save_file(_storable(tensors), str(path), metadata={"format": FORMAT})
                digest, size = sha256_file(path), path.stat().st_size
                storage.put_file(path, storage.join(prefix, TENSORS))
            manifest = {
                "format": FORMAT,
                "stage": self.stage,
                "config_hash": self.config_hash,
                "inputs": self.inputs,
                "position": asdict(position),
                "structure": structure,
                "tensors": {"file": TENSORS, "sha256": digest, "bytes": size},
                "created": time.time(),
            }
            storage.put_bytes(json.dumps(manifest, indent=1).encode(), storage.join(prefix, MANIFEST))
        except StorageError as err:
            raise self.store_failed(err, "write a checkpoint") from None
        except (OSError, SafetensorError) as err:  # a local disk (temp folder, local store) is full
            text = getattr(err, "strerror", None) or str(err).split("I/O error: ")[-1]
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            disk = StorageError(f"{text}{where}", "free disk space (or set TMPDIR to a larger disk)")
            raise self.store_failed(disk, "write a checkpoint") from None
        self.saved += 1
        self.last, self._last_uri = position, prefix
        log.info(
            "%s: checkpoint %d (%s%s, step %d%s) saved to %s in %.1f s",
            self.stage, number, position.phase, f" block {position.block}" if position.block else "",
            position.step, ", done" if position.done else "", prefix, time.perf_counter() - started,
        )  # fmt: skip
        self._prune(existing, number)
        return prefix

    def store_failed(self, err: StorageError, what: str) -> StorageError:
        """``err`` restated for the user: what failed, and which checkpoint a restart resumes from."""
        good = self.last or self.resumed_from
        where = self._last_uri or self.uri
        kept = (
            f"; the last good checkpoint ({good.phase}{f' block {good.block}' if good.block else ''}, "
            f"step {good.step}) at {where} is intact"
            if good is not None
            else "; no checkpoint of this attempt was written yet"
        )
        return StorageError(
            f"{self.stage}: could not {what}: {err.problem}{kept}",
            f"{err.fix}. Then restart the stage (a KFP retry, or a rerun with the same run id): "
            "it resumes from the last good checkpoint",
        )

    def _prune(self, existing: Mapping[int, bool], newest: int) -> None:
        complete = sorted([n for n, ok in existing.items() if ok] + [newest], reverse=True)
        stale = set(complete[self.keep :]) | {n for n, ok in existing.items() if not ok and n < newest}
        for n in sorted(stale):
            try:
                storage.remove(self._prefix(n))
            except StorageError as err:  # cleanup never fails training
                log.warning("%s: could not delete old checkpoint %d: %s", self.stage, n, err.problem)

    def hook(
        self,
        objects: Mapping[str, Stateful],
        phase: str,
        *,
        block: int = 0,
        data: Mapping[str, Any] | None = None,
        offset: float = 0.0,
    ) -> Callable[[int], None]:
        """The ``checkpoint`` callback of :func:`dfka.engine.loop.run_loop` for one phase/block."""
        started = time.perf_counter()
        frozen = json.loads(json.dumps(dict(data or {})))

        def at(step: int) -> None:
            seconds = offset + time.perf_counter() - started
            self.save(objects, Position(phase, step, block, False, seconds, frozen))

        return at

    # ------------------------------------------------------------ reading

    def _load(self, number: int) -> _Loaded | None:
        """Checkpoint ``number`` verified, or ``None`` (with a warning) if it is damaged."""
        prefix = self._prefix(number)
        try:
            manifest = json.loads(storage.get_bytes(storage.join(prefix, MANIFEST)))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            log.warning("%s: checkpoint %s has an unreadable manifest (%s); skipped", self.stage, prefix, err)
            return None
        except StorageError as err:
            if "corrupt" not in err.problem:
                raise
            log.warning("%s: %s; skipped", self.stage, err.problem)
            return None
        self._check_identity(manifest, prefix)
        if manifest.get("inputs") != self.inputs:
            # same config, other inputs: an upstream stage ran again (e.g. on a time budget) under this
            # run id. That progress was made on other data; it cannot be resumed, and it is not an error.
            log.warning(
                "%s: checkpoint %s was trained on other inputs (%s, now %s); starting afresh",
                self.stage, prefix, manifest.get("inputs"), self.inputs,
            )  # fmt: skip
            return None
        with tempfile.TemporaryDirectory(prefix="dfka-ckpt-") as tmp:
            path = Path(tmp) / TENSORS
            try:
                storage.get_file(storage.join(prefix, TENSORS), path)
            except StorageError as err:
                if "corrupt" not in err.problem and "does not exist" not in err.problem:
                    raise
                log.warning("%s: %s; checkpoint skipped", self.stage, err.problem)
                return None
            if sha256_file(path) != manifest.get("tensors", {}).get("sha256"):
                log.warning("%s: %s/%s fails its sha256 check; skipped", self.stage, prefix, TENSORS)
                return None
            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as err:
                log.warning("%s: %s/%s is not readable (%s); skipped", self.stage, prefix, TENSORS, err)
                return None
        return _Loaded(number, manifest, tensors)

    def _check_identity(self, manifest: Mapping[str, Any], prefix: str) -> None:
        fix = (
            f"a run id belongs to one config: start a new run (a new run id), or delete {self.uri} "
            "to discard these checkpoints"
        )
        if manifest.get("format") != FORMAT or manifest.get("stage") != self.stage:
            raise CheckpointError(
                f"{prefix} is not a {self.stage} checkpoint of this dfka version "
                f"(format {manifest.get('format')!r}, stage {manifest.get('stage')!r})",
                fix,
            )
        if manifest.get("config_hash") != self.config_hash:
            raise CheckpointError(
                f"the checkpoint at {prefix} was written for config {manifest.get('config_hash')}, "
                f"but this {self.stage} stage runs config {self.config_hash}; refusing to resume from it",
                fix,
            )

    def latest(self) -> _Loaded | None:
        """The newest complete checkpoint that passes verification (``None`` if there is none)."""
        for number in sorted((n for n, ok in self._scan().items() if ok), reverse=True):
            loaded = self._load(number)
            if loaded is not None:
                return loaded
        return None

    def restore(self, objects: Mapping[str, Stateful]) -> Position | None:
        """Load the newest good checkpoint into ``objects`` and the process RNGs; its position, or ``None``.

        Every rank loads the same one; none goes on before all have (rank 0 then prunes old ones)."""
        try:
            return self._restore(objects)
        finally:
            dist.barrier()

    def _restore(self, objects: Mapping[str, Stateful]) -> Position | None:
        loaded = self.latest()
        if loaded is None:
            return None
        structure, tensors = loaded.manifest["structure"], loaded.tensors
        prefix = self._prefix(loaded.number)
        missing = sorted(set(objects) - set(structure))
        if missing:
            raise CheckpointError(
                f"the checkpoint at {prefix} has no state for {missing}",
                f"it comes from another dfka version; delete {self.uri} to start the stage afresh",
            )
        try:
            for name, obj in objects.items():
                obj.load_state_dict(unpack(structure[name], tensors))
            set_rng_state(unpack(structure[_RNG], tensors))
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(
                f"the checkpoint at {prefix} does not fit this stage's models ({str(err).splitlines()[0]})",
                f"it comes from another dfka version; delete {self.uri} to start the stage afresh",
            ) from None
        position = Position(**loaded.manifest["position"])
        self.resumed_from, self._last_uri = position, prefix
        log.warning(
            "%s: resuming from checkpoint %s (%s%s, step %d)",
            self.stage, prefix, position.phase, f" block {position.block}" if position.block else "",
            position.step,
        )  # fmt: skip
        return position

    @contextmanager
    def writing_outputs(self) -> Iterator[None]:
        """Around a finished stage's output writes: a store failure is restated with the intact
        checkpoint (:meth:`store_failed`); on success the checkpoints are no longer needed (:meth:`clear`)."""
        try:
            yield
        except StorageError as err:
            raise self.store_failed(err, "write its outputs") from None
        self.clear()

    def clear(self) -> None:
        """Delete every checkpoint of the stage (after it succeeded), unless ``DFKA_KEEP_CHECKPOINTS=1``."""
        if os.environ.get(KEEP_ENV, "").strip() in ("1", "true", "yes") or not dist.process().main:
            return
        try:
            storage.remove(self.uri)
        except StorageError as err:
            log.warning("%s: could not delete the checkpoints at %s: %s", self.stage, self.uri, err.problem)

    def summary(self) -> dict[str, Any]:
        """What the stage result records about its checkpoints."""
        return {
            "uri": self.uri,
            "every": self.every,
            "saved": self.saved,
            "resumed_from": asdict(self.resumed_from) if self.resumed_from else None,
        }
