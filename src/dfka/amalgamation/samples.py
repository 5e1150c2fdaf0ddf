"""Synthetic samples: an on-the-fly sampler, an in-memory bank, and sharded checksummed exports.

Each sample carries what stage 2 consumes: the latent ``z``, the image ``I_g``, the generator's
intermediate features ``F_g`` at teacher levels ``1..B-1``, and every teacher's logits on the image.
Teacher logits are stored raw, so the union rule and its routing calibration can change after export
without re-running the teachers.

Export layout (``uri`` is a local dir or ``s3://``)::

    shard-00000.safetensors … shard-0000K.safetensors   written first
    samples.json                                        written last: shard list, sha256s, counts, shapes

A reader never sees a partial export (no ``samples.json`` until every shard is in place) and detects a
corrupted shard by its sha256.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from dfka.amalgamation.batch import SampleBatch
from dfka.amalgamation.stage1 import AmalgamatingGAN
from dfka.bundles import sha256_file
from dfka.engine import distributed as dist
from dfka.errors import ConfigError, StorageError
from dfka.models import frozen_bn_stats
from dfka.progress import bar as progress_bar

SAMPLES_MANIFEST = "samples.json"
SAMPLES_FORMAT = "dfka.samples/v1"


class Sampler:
    """Draws batches from a trained (frozen) generator and scores them with the teachers once.

    The generator samples with BatchNorm in training mode (batch statistics), as it was trained; it is
    never updated here.
    """

    def __init__(
        self, gan: AmalgamatingGAN, seed: int, batch_size: int = 256, device: torch.device | None = None
    ):
        self.gan = gan
        self.batch_size = batch_size
        self.device = device or torch.device("cpu")
        self.rng = torch.Generator().manual_seed(seed)
        # the compute path stage 1 trained on (idempotent): a GAN loaded from its artifact then samples
        # exactly like the one still in memory
        gan.teachers.path.accelerate(gan.generator, self.device)

    @torch.no_grad()
    def sample(self, n: int | None = None) -> SampleBatch:
        n = n or self.batch_size
        gen = self.gan.generator
        was_training = gen.training
        gen.train()
        z = self.gan.sample_latent(n, self.rng, self.device)
        with frozen_bn_stats(gen):
            feats = gen(z)
        gen.train(was_training)
        image = feats[-1]
        levels = {gen.level_of_group(j): feats[j - 1] for j in range(1, gen.num_groups)}
        logits = {name: model(image) for name, model in self.gan.compute.items()}
        return SampleBatch(z, image, levels, logits)

    def __iter__(self) -> Iterator[SampleBatch]:
        while True:
            yield self.sample()


class SampleBank:
    """A finite set of samples held in memory (images and features in float16 by default)."""

    def __init__(self, tensors: dict[str, torch.Tensor], teacher_names: list[str], levels: list[int]):
        self.tensors = tensors
        self.teacher_names = teacher_names
        self.levels = levels

    def __len__(self) -> int:
        return self.tensors["image"].shape[0]

    @classmethod
    def generate(
        cls,
        sampler: Sampler,
        n: int,
        dtype: torch.dtype = torch.float16,
        progress: bool = True,
        *,
        seconds: float | None = None,
        at_least: int = 1,
    ) -> SampleBank:
        """``n`` samples, or as many as ``seconds`` allow (but at least ``at_least``)."""
        parts: dict[str, list[torch.Tensor]] = {}
        names: list[str] = []
        levels: list[int] = []
        done = 0
        deadline = None if seconds is None else time.perf_counter() + seconds
        with progress_bar(total=n, desc="sampling", unit="img", progress=progress, leave=False) as bar:
            while done < n and (deadline is None or done < at_least or time.perf_counter() < deadline):
                batch = sampler.sample(min(sampler.batch_size, n - done))
                names, levels = list(batch.logits), sorted(batch.features)
                for key, value in _flatten(batch).items():
                    keep = value.float() if key.startswith("logits.") else value.to(dtype)
                    parts.setdefault(key, []).append(keep.cpu())
                done += len(batch)
                bar.update(len(batch))
        return cls({k: torch.cat(v) for k, v in parts.items()}, names, levels)

    @classmethod
    def concat(cls, banks: list[SampleBank]) -> SampleBank:
        first = banks[0]
        if len(banks) == 1:
            return first
        tensors = {
            k: torch.cat([b.tensors[k].to(first.tensors[k].dtype) for b in banks]) for k in first.tensors
        }
        return cls(tensors, first.teacher_names, first.levels)

    def batch(self, index: torch.Tensor, device: torch.device | None = None) -> SampleBatch:
        t = {k: v[index] for k, v in self.tensors.items()}
        batch = SampleBatch(
            t["z"],
            t["image"],
            {lvl: t[f"feat.{lvl}"] for lvl in self.levels},
            {name: t[f"logits.{name}"] for name in self.teacher_names},
            index,
        )
        return batch.to(device or torch.device("cpu"))

    def batches(
        self, batch_size: int, rng: torch.Generator, device: torch.device | None = None
    ) -> BatchStream:
        """Endless shuffled mini-batches (a new permutation per pass); resumable, see :class:`BatchStream`."""
        return BatchStream(self, batch_size, rng, device)


class BatchStream(Iterator[SampleBatch]):
    """The endless shuffled mini-batches of a bank, as an iterator whose position can be checkpointed.

    Each pass draws a permutation from ``rng`` and yields the full batches of it in order (the
    remainder is dropped). The state is the RNG state at the start of the current pass plus the index
    in it, so a restored stream redraws the same permutation and continues with the same batch.
    """

    def __init__(self, bank: SampleBank, batch_size: int, rng: torch.Generator, device: torch.device | None):
        if len(bank) < batch_size:
            raise ConfigError(
                f"the sample bank holds {len(bank)} samples, fewer than one batch of {batch_size}",
                "raise export.samples or lower the batch size",
            )
        self.bank, self.batch_size, self.rng, self.device = bank, batch_size, rng, device
        self._order: torch.Tensor | None = None
        self._pass_rng: torch.Tensor | None = None
        self._pos = 0

    def __next__(self) -> SampleBatch:
        if self._order is None or self._pos + self.batch_size > len(self.bank):
            self._pass_rng = self.rng.get_state()
            self._order = torch.randperm(len(self.bank), generator=self.rng)
            self._pos = 0
        index = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        index = dist.local(index)  # several ranks: each trains on its rows of the global batch
        return self.bank.batch(index, self.device)

    def state_dict(self) -> dict[str, Any]:
        if self._order is None:
            return {"rng": self.rng.get_state(), "pass_rng": None, "pos": 0}
        return {"rng": self.rng.get_state(), "pass_rng": self._pass_rng, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["pass_rng"] is None:
            self.rng.set_state(state["rng"])
            self._order, self._pass_rng, self._pos = None, None, 0
            return
        self.rng.set_state(state["pass_rng"])
        self._pass_rng = state["pass_rng"]
        self._order = torch.randperm(len(self.bank), generator=self.rng)
        self._pos = int(state["pos"])


class TrajectoryCollector:
    """Keeps a uniform random subset (reservoir) of the samples stage 1 generates after ``start`` of its
    schedule, so the bank mixes generator states along the trajectory, like the stream a co-trained
    student sees in DAFL. The samples come for free: the step already generated and scored them.
    """

    def __init__(self, capacity: int, start: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float16):
        self.capacity = capacity
        self.start = start
        self.dtype = dtype
        self.seen = 0
        self.rng = torch.Generator().manual_seed(seed)
        self.store: dict[str, torch.Tensor] = {}
        self.teacher_names: list[str] = []
        self.levels: list[int] = []

    def __call__(self, step: int, total: int, batch: SampleBatch) -> None:
        if step < self.start * total:
            return
        flat = {
            k: (v.float() if k.startswith("logits.") else v.to(self.dtype)).cpu()
            for k, v in _flatten(batch).items()
        }
        n = len(batch)
        if not self.store:
            self.teacher_names, self.levels = list(batch.logits), sorted(batch.features)
            self.store = {k: v.new_zeros(self.capacity, *v.shape[1:]) for k, v in flat.items()}
        # reservoir sampling, vectorised over the batch: sample i is the (seen+i+1)-th candidate
        rank = torch.arange(self.seen + 1, self.seen + n + 1, dtype=torch.float64)
        slot = (torch.rand(n, generator=self.rng, dtype=torch.float64) * rank).long()
        fill = rank <= self.capacity
        slot[fill] = rank[fill].long() - 1
        keep = slot < self.capacity
        for k, v in flat.items():
            self.store[k][slot[keep]] = v[keep]
        self.seen += n

    def state_dict(self) -> dict[str, Any]:
        """The reservoir, the count seen and the RNG: what a resumed stage 1 needs to keep the same samples."""
        return {
            "seen": self.seen,
            "rng": self.rng.get_state(),
            "store": dict(self.store),
            "teacher_names": list(self.teacher_names),
            "levels": list(self.levels),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.rng.set_state(state["rng"])
        self.store = dict(state["store"])
        self.teacher_names, self.levels = list(state["teacher_names"]), [int(x) for x in state["levels"]]

    def bank(self) -> SampleBank:
        size = min(self.seen, self.capacity)
        return SampleBank({k: v[:size] for k, v in self.store.items()}, self.teacher_names, self.levels)


def _flatten(batch: SampleBatch) -> dict[str, torch.Tensor]:
    out = {"z": batch.z, "image": batch.image}
    out.update({f"feat.{lvl}": f for lvl, f in batch.features.items()})
    out.update({f"logits.{name}": v for name, v in batch.logits.items()})
    return out


class SamplesManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: str = SAMPLES_FORMAT
    count: int
    teachers: list[str]
    levels: list[int]
    shapes: dict[str, list[int]]
    dtype: str
    shards: list[dict[str, str | int]]
    extra: dict[str, Any] = {}


def export_bank(
    bank: SampleBank,
    uri: str,
    shard_size: int = 10000,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> SamplesManifest:
    """Write ``bank`` as sharded safetensors plus ``samples.json`` (manifest last); ``extra`` is stored in
    the manifest as is (e.g. the union rule and its routing calibration)."""
    from dfka import storage

    shards = []
    with tempfile.TemporaryDirectory(prefix="dfka-samples-") as tmp:
        n = len(bank)
        starts = list(range(0, n, shard_size))
        for i, start in enumerate(
            progress_bar(starts, desc="exporting shards", progress=progress, leave=False)
        ):
            name = f"shard-{i:05d}.safetensors"
            path = Path(tmp) / name
            save_file(
                {k: v[start : start + shard_size].contiguous() for k, v in bank.tensors.items()}, str(path)
            )
            entry = {"file": name, "count": min(shard_size, n - start), "sha256": sha256_file(path)}
            storage.put_file(path, storage.join(uri, name))
            path.unlink()
            shards.append(entry)
        manifest = SamplesManifest(
            count=n,
            teachers=bank.teacher_names,
            levels=bank.levels,
            shapes={k: list(v.shape[1:]) for k, v in bank.tensors.items()},
            dtype=str(bank.tensors["image"].dtype).removeprefix("torch."),
            shards=shards,
            extra=dict(extra or {}),
        )
        storage.put_bytes(manifest.model_dump_json(indent=2).encode(), storage.join(uri, SAMPLES_MANIFEST))
    return manifest


def read_manifest(uri: str) -> SamplesManifest:
    from dfka import storage

    key = storage.join(uri, SAMPLES_MANIFEST)
    if not storage.exists(key):
        raise StorageError(
            f"no complete sample export at {uri} ({SAMPLES_MANIFEST} is missing)",
            "run the export stage (it writes the manifest only after every shard is in place)",
        )
    return SamplesManifest.model_validate(json.loads(storage.get_bytes(key)))


def iter_shards(uri: str) -> Iterator[dict[str, torch.Tensor]]:
    """Stream an export shard by shard, verifying each shard's sha256 against the manifest."""
    from dfka import storage

    manifest = read_manifest(uri)
    with tempfile.TemporaryDirectory(prefix="dfka-samples-") as tmp:
        for entry in manifest.shards:
            path = Path(tmp) / str(entry["file"])
            storage.get_file(storage.join(uri, str(entry["file"])), path)
            if sha256_file(path) != entry["sha256"]:
                raise StorageError(
                    f"sample shard {entry['file']} at {uri} is corrupted (sha256 mismatch)",
                    "re-run the export stage to rewrite the samples",
                )
            yield load_file(str(path))
            path.unlink()


def read_bank(uri: str) -> SampleBank:
    manifest = read_manifest(uri)
    parts: dict[str, list[torch.Tensor]] = {}
    for shard in iter_shards(uri):
        for k, v in shard.items():
            parts.setdefault(k, []).append(v)
    return SampleBank({k: torch.cat(v) for k, v in parts.items()}, manifest.teachers, manifest.levels)
