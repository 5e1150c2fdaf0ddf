"""Synthetic sample banks: trajectory reservoir, sharded export with checksums, artifacts round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dfka.amalgamation.artifacts import load_dual, load_gan, save_dual, save_gan
from dfka.amalgamation.batch import SampleBatch
from dfka.amalgamation.config import GanConfig
from dfka.amalgamation.run import build_student, teacher_set_from_bundles
from dfka.amalgamation.samples import (
    SampleBank,
    Sampler,
    TrajectoryCollector,
    export_bank,
    iter_shards,
    read_bank,
    read_manifest,
)
from dfka.amalgamation.stage1 import AmalgamatingGAN
from dfka.amalgamation.stage2 import DualGenerator
from dfka.amalgamation.union import UnionRule
from dfka.errors import BundleError, StorageError
from tests.toys import toy_teacher


@pytest.fixture(scope="module")
def setup():
    pair = [
        toy_teacher([0, 1, 2, 3], name="a", seed=1, steps=5),
        toy_teacher([4, 5, 6, 7], name="b", seed=2, steps=5),
    ]
    teachers = teacher_set_from_bundles(pair, None)
    union = UnionRule(teachers)
    gan = AmalgamatingGAN(teachers, union, GanConfig(widths=8, batch_size=8))
    return teachers, union, gan


def test_export_round_trip_is_exact_and_manifest_last(setup, tmp_path: Path) -> None:
    _, _, gan = setup
    bank = SampleBank.generate(Sampler(gan, seed=0, batch_size=32), 70, progress=False)
    manifest = export_bank(bank, str(tmp_path / "x"), shard_size=30, progress=False, extra={"rule": "logits"})
    assert [s["count"] for s in manifest.shards] == [30, 30, 10]
    assert read_manifest(str(tmp_path / "x")).extra == {"rule": "logits"}
    back = read_bank(str(tmp_path / "x"))
    assert back.teacher_names == ["a", "b"] and back.levels == [1, 2]
    for key, value in bank.tensors.items():
        assert torch.equal(back.tensors[key], value), key
    assert bank.tensors["image"].dtype == torch.float16 and bank.tensors["logits.a"].dtype == torch.float32


def test_partial_export_is_invisible_and_corruption_detected(setup, tmp_path: Path) -> None:
    _, _, gan = setup
    bank = SampleBank.generate(Sampler(gan, seed=0, batch_size=32), 40, progress=False)
    out = tmp_path / "x"
    export_bank(bank, str(out), shard_size=20, progress=False)
    (out / "samples.json").rename(tmp_path / "later.json")  # as if the export died before its manifest
    with pytest.raises(StorageError, match="no complete sample export"):
        read_bank(str(out))
    (tmp_path / "later.json").rename(out / "samples.json")
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=r"shard-00001.*corrupted"):
        list(iter_shards(str(out)))


def test_trajectory_reservoir_is_uniform_and_bounded(setup) -> None:
    _teachers, _, _ = setup
    collector = TrajectoryCollector(capacity=50, start=0.5, seed=0)
    for step in range(100):
        n = 4
        batch = SampleBatch(
            z=torch.full((n, 3), float(step)),
            image=torch.zeros(n, 1, 12, 12),
            features={1: torch.zeros(n, 2)},
            logits={"a": torch.zeros(n, 4), "b": torch.zeros(n, 4)},
        )
        collector(step, 100, batch)
    assert collector.seen == 50 * 4  # steps before 50% are ignored
    bank = collector.bank()
    assert len(bank) == 50
    steps = bank.tensors["z"][:, 0].float()
    assert steps.min() >= 50
    # a uniform reservoir over steps 50..99 keeps early and late samples alike
    assert (steps < 75).sum() > 10 and (steps >= 75).sum() > 10


def test_gan_and_dual_artifacts_round_trip(setup, tmp_path: Path) -> None:
    teachers, union, gan = setup
    save_gan(gan, str(tmp_path / "gan"))
    back = load_gan(str(tmp_path / "gan"), teachers, union)
    z = gan.sample_latent(4, torch.Generator().manual_seed(0), torch.device("cpu"))
    gan.generator.eval()
    saved, loaded = gan.state_dict(), back.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # outputs agree up to float rounding (a generator that has sampled runs the fast path's kernels)
    torch.testing.assert_close(back.generator(z)[-1], gan.generator(z)[-1], rtol=1e-5, atol=1e-6)
    channels = {lvl: s[0] for lvl, s in enumerate(gan.generator_level_shapes())}
    dual = DualGenerator(build_student("lenet5:0.5", teachers), teachers, channels).eval()
    save_dual(dual, str(tmp_path / "dual"), channels)
    dual2, meta = load_dual(str(tmp_path / "dual"), teachers)
    x = torch.rand(3, 1, 12, 12)
    assert torch.equal(
        dual2.branch_scores(dual2.student.run_blocks(x)), dual.branch_scores(dual.student.run_blocks(x))
    )
    assert meta["student"]["arch"] == "lenet5"
    # a tampered artifact is refused
    manifest = tmp_path / "gan" / "gan.json"
    data = json.loads(manifest.read_text())
    data["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="sha256"):
        load_gan(str(tmp_path / "gan"), teachers, union)
