"""Checkpoint and resume of the two training stages (issue #7, part 1).

* The checkpoint format: safetensors + JSON, manifest last, the previous checkpoint kept until the next
  is complete, damaged checkpoints skipped, another config's checkpoint refused.
* In process: a stage cut off at every kind of point (mid-phase, at a block end, in a later block)
  resumes to bit-identical weights.
* For real: the stage process (the KFP component's code) is SIGKILLed mid-run with its checkpoints in
  a real SeaweedFS, restarted with the same run id, and ends with the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import dfka.amalgamation.run as engine_run
from dfka import stages, storage
from dfka.amalgamation.config import AmalgamationConfig, Budget
from dfka.amalgamation.run import regroup, teacher_set_from_bundles, train_blocks, train_gan
from dfka.amalgamation.union import UnionRule
from dfka.engine.checkpoint import MANIFEST, TENSORS, Checkpoints, Position, pack, unpack
from dfka.engine.loop import run_loop
from dfka.errors import CheckpointError, ConfigError
from dfka.stages.context import RunContext
from tests import faults
from tests.toys import toy_teacher

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the format


class Box:
    """A stateful object with the awkward parts of real state dicts: int keys, tuples, None, RNG."""

    def __init__(self, seed: int) -> None:
        self.rng = torch.Generator().manual_seed(seed)
        self.weights = torch.randn(3, 4, generator=self.rng)
        self.extra: dict = {0: {"step": torch.tensor(7.0), "betas": (0.5, 0.999)}, "none": None}

    def state_dict(self) -> dict:
        return {"rng": self.rng.get_state(), "weights": self.weights, "extra": self.extra}

    def load_state_dict(self, state: dict) -> None:
        self.rng.set_state(state["rng"])
        self.weights = state["weights"]
        self.extra = state["extra"]


def test_pack_round_trip_keeps_types() -> None:
    state = {
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"betas": (0.9, 0.99)}]},
        "rng": (3, (1, 2, 3), None),
        "numpy": np.random.get_state(),
        "$odd": "key",
    }
    tensors: dict[str, torch.Tensor] = {}
    doc = json.loads(json.dumps(pack(state, tensors, "x")))  # the structure is plain JSON
    back = unpack(doc, tensors)
    assert list(back["optimizer"]["state"]) == [0] and torch.equal(
        back["optimizer"]["state"][0]["exp_avg"], torch.ones(2)
    )
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back["rng"] == (3, (1, 2, 3), None) and back["$odd"] == "key"
    assert back["numpy"][1].dtype == np.uint32 and np.array_equal(back["numpy"][1], state["numpy"][1])
    with pytest.raises(TypeError, match="cannot checkpoint"):
        pack({"f": object()}, {}, "x")


def test_checkpoint_holds_state_rngs_position_and_hash(tmp_path: Path) -> None:
    ckpt = Checkpoints(str(tmp_path / "c"), stage="s", config_hash="abc", every=5)
    box = Box(1)
    torch.manual_seed(123)
    random.seed(4)
    prefix = ckpt.save({"box": box}, Position("gan", 10, seconds=1.5))
    expected = (torch.rand(3), random.random(), box.weights.clone(), torch.randn(2, generator=box.rng))
    files = sorted(p.name for p in Path(prefix).iterdir())
    assert files == [MANIFEST, TENSORS]  # nothing else: no pickle anywhere
    manifest = json.loads((Path(prefix) / MANIFEST).read_text())
    assert manifest["config_hash"] == "abc" and manifest["position"]["step"] == 10
    assert manifest["format"] == "dfka.engine.checkpoint/v1" and len(manifest["tensors"]["sha256"]) == 64

    other = Box(99)
    torch.manual_seed(0)
    random.seed(0)
    at = Checkpoints(str(tmp_path / "c"), stage="s", config_hash="abc").restore({"box": other})
    assert at == Position("gan", 10, seconds=1.5)
    got = (torch.rand(3), random.random(), other.weights, torch.randn(2, generator=other.rng))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]  # process RNGs are back
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    assert other.extra[0]["betas"] == (0.5, 0.999) and float(other.extra[0]["step"]) == 7.0


def test_partial_and_damaged_checkpoints_never_replace_the_last_good_one(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    ckpt = Checkpoints(uri, stage="s", config_hash="h", keep=2)
    for step in (5, 10):
        ckpt.save({"box": Box(step)}, Position("gan", step))
    # a writer that died between the tensors and the manifest: invisible to readers
    partial = tmp_path / "c" / "ckpt-000003"
    partial.mkdir()
    (partial / TENSORS).write_bytes((tmp_path / "c" / "ckpt-000002" / TENSORS).read_bytes())
    assert Checkpoints(uri, stage="s", config_hash="h").restore({"box": Box(0)}).step == 10
    # the newest complete checkpoint damaged (bit rot, a truncated copy): the previous one is used
    newest = tmp_path / "c" / "ckpt-000002" / TENSORS
    newest.write_bytes(newest.read_bytes()[:-7])
    assert Checkpoints(uri, stage="s", config_hash="h").restore({"box": Box(0)}).step == 5
    # a new checkpoint supersedes: the partial one and all but the newest `keep` complete ones go
    ckpt.save({"box": Box(1)}, Position("gan", 15))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ckpt-000002", "ckpt-000004"]
    ckpt.clear()
    assert not (tmp_path / "c").exists()


def test_a_pickle_in_the_checkpoint_folder_is_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    uri = str(tmp_path / "c")
    ckpt = Checkpoints(uri, stage="s", config_hash="h")
    prefix = Path(ckpt.save({"box": Box(1)}, Position("gan", 5)))
    (prefix / TENSORS).write_bytes(pickle.dumps(Evil()))  # swapped for a pickle: fails the sha256 check
    assert Checkpoints(uri, stage="s", config_hash="h").restore({"box": Box(0)}) is None
    assert not marker.exists()


def test_another_configs_checkpoint_is_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "c")
    Checkpoints(uri, stage="train-amalgamating-gan", config_hash="aaaa").save(
        {"box": Box(1)}, Position("gan", 5)
    )
    with pytest.raises(CheckpointError) as err:
        Checkpoints(uri, stage="train-amalgamating-gan", config_hash="bbbb").restore({"box": Box(0)})
    assert "written for config aaaa" in err.value.problem and "runs config bbbb" in err.value.problem
    assert "new run id" in err.value.fix and uri in err.value.fix
    # same config, other inputs (an upstream stage re-ran under this run id): not resumable, not an error
    other_inputs = Checkpoints(uri, stage="train-amalgamating-gan", config_hash="aaaa", inputs={"samples": 1})
    assert other_inputs.restore({"box": Box(0)}) is None


def test_bad_interval_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DFKA_CHECKPOINT_EVERY", "often")
    with pytest.raises(ConfigError, match="DFKA_CHECKPOINT_EVERY='often' is not a step count"):
        Checkpoints(str(tmp_path), stage="s", config_hash="h")


# ---------------------------------------------------------------- resume in process


class Cut(Exception):
    """Stands in for a crash after a given number of steps (the subprocess tests use real SIGKILLs)."""


@pytest.fixture(scope="module")
def toy():
    pair = [toy_teacher([0, 1, 2, 3], name="a", seed=1), toy_teacher([4, 5, 6, 7], name="b", seed=2)]
    cfg = AmalgamationConfig.model_validate(
        {**faults.METHOD, "blocks": {"batch_size": 16, "budget": {"steps": 30}}}
    )
    teachers = teacher_set_from_bundles(pair, None)
    gan, bank, _ = train_gan(teachers, UnionRule(teachers), cfg, device=CPU, progress=False)
    channels = {level: shape[0] for level, shape in enumerate(gan.generator_level_shapes())}
    return pair, cfg, gan, bank, channels


def _cut_after(monkeypatch: pytest.MonkeyPatch, steps: int | None) -> None:
    done = {"n": 0}

    def loop(step_fn, *args, **kwargs):
        def step(i: int, total: int):
            if steps is not None and done["n"] >= steps:
                raise Cut
            done["n"] += 1
            return step_fn(i, total)

        return run_loop(step, *args, **kwargs)

    monkeypatch.setattr(engine_run, "run_loop", loop)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.startswith("teachers.")}


def test_gan_resumes_bit_identically_in_process(toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pair, cfg, reference, reference_bank, _ = toy
    teachers = teacher_set_from_bundles(pair, None)
    _cut_after(monkeypatch, 17)
    with pytest.raises(Cut):
        train_gan(teachers, UnionRule(teachers), cfg, device=CPU, progress=False,
                  checkpoints=Checkpoints(str(tmp_path), stage="gan", config_hash="h", every=7))  # fmt: skip
    _cut_after(monkeypatch, None)
    teachers = teacher_set_from_bundles(pair, None)
    resumed = Checkpoints(str(tmp_path), stage="gan", config_hash="h", every=7)
    gan, bank, report = train_gan(
        teachers, UnionRule(teachers), cfg, device=CPU, progress=False, checkpoints=resumed
    )
    assert resumed.resumed_from.step == 14 and report.steps == faults.GAN_STEPS
    a, b = _state(reference), _state(gan)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(
        torch.equal(reference_bank.tensors[k], bank.tensors[k]) for k in bank.tensors
    )  # same reservoir


@pytest.mark.parametrize(
    ("cut", "block", "step", "done"),
    [(5, 1, 4, False), (13, 1, 10, True), (20, 2, 10, True), (25, 3, 4, False)],
    ids=["mid-block-1", "after-block-1", "after-block-2", "mid-block-3"],
)
def test_blocks_resume_bit_identically_in_process(
    toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int, block: int, step: int, done: bool
) -> None:
    pair, cfg, _, bank, channels = toy

    def run(checkpoints: Checkpoints | None):
        teachers = teacher_set_from_bundles(pair, None)
        return train_blocks(
            teachers,
            UnionRule(teachers),
            bank,
            cfg,
            channels,
            device=CPU,
            progress=False,
            checkpoints=checkpoints,
        )

    reference, ref_report = run(None)
    _cut_after(monkeypatch, cut)
    with pytest.raises(Cut):
        run(Checkpoints(str(tmp_path), stage="blocks", config_hash="h", every=4))
    _cut_after(monkeypatch, None)
    resumed = Checkpoints(str(tmp_path), stage="blocks", config_hash="h", every=4)
    dual, report = run(resumed)
    at = resumed.resumed_from
    assert (at.block, at.step, at.done) == (block, step, done)
    a, b = _state(reference), _state(dual)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report.steps == ref_report.steps and set(report.extra) == set(ref_report.extra)


def test_finetune_resumes_bit_identically_in_process(
    toy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair, cfg, _, bank, channels = toy
    cfg = cfg.model_copy(update={"regroup": cfg.regroup.model_copy(update={"finetune": Budget(steps=20)})})
    teachers = teacher_set_from_bundles(pair, None)
    dual, _ = train_blocks(teachers, UnionRule(teachers), bank, cfg, channels, device=CPU, progress=False)

    def run(checkpoints: Checkpoints | None):
        return regroup(
            copy.deepcopy(dual),
            UnionRule(teachers),
            bank,
            cfg,
            device=CPU,
            progress=False,
            checkpoints=checkpoints,
        )

    reference, _ = run(None)
    _cut_after(monkeypatch, 14)
    with pytest.raises(Cut):
        run(Checkpoints(str(tmp_path), stage="regroup", config_hash="h", every=6))
    _cut_after(monkeypatch, None)
    resumed = Checkpoints(str(tmp_path), stage="regroup", config_hash="h", every=6)
    net, report = run(resumed)
    assert resumed.resumed_from.step == 12 and report.steps == 20
    a, b = reference.state_dict(), net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- SIGKILL, real object store


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> faults.ToyRun:
    return faults.toy_run(tmp_path_factory.mktemp("reference"))


@dataclass
class Kill:
    """One training stage to kill: its process arguments, when to kill it, what it must end with."""

    stage: str  # the KFP task name
    kind: str  # tests.stage_process's argument
    every: int
    kill_when: Callable[[dict], bool]  # on the newest checkpoint's position
    weights: str  # the output file compared with the reference


KILLS = [
    Kill("train-amalgamating-gan", "gan", 5, lambda p: p["step"] >= 10, "gan.safetensors"),
    # mid-way through block 2: block 1 finished and its end-of-block checkpoint was superseded
    Kill("train-dual-generator-blocks", "blocks", 4, lambda p: p["block"] == 2, "dual.safetensors"),
]


@pytest.mark.integration
def test_sigkilled_training_stages_resume_to_the_same_weights(stack_env, reference, tmp_path: Path) -> None:
    """Both training stages at once (each a process of its own, with its own run id), to halve the wait."""
    runs = {}
    for k in KILLS:
        run_id = f"test-kill-{k.kind}-{uuid.uuid4().hex[:6]}"
        inputs = (reference.teacher_set,) if k.kind == "gan" else (reference.teacher_set, reference.export)
        runs[k.kind] = {
            "env": {"DFKA_KFP_RUN_ID": run_id, "DFKA_CHECKPOINT_EVERY": str(k.every)},
            "uri": f"s3://{stack_env.bucket}/runs/{run_id}/{k.stage}/checkpoints",
            "args": (*inputs, str(tmp_path / k.kind)),
        }
    procs = {
        k.kind: faults.stage_process(
            k.kind,
            *runs[k.kind]["args"],
            env=runs[k.kind]["env"],
            log=tmp_path / f"{k.kind}-1.log",
            step_seconds=0.05,
        )
        for k in KILLS
    }
    try:
        pending = {k.kind: faults.checkpoint_at(runs[k.kind]["uri"], k.kill_when) for k in KILLS}

        def kill_the_ready() -> bool:  # kill -9 each as soon as it has a checkpoint past its point
            for kind, ready in list(pending.items()):
                assert procs[kind].poll() is None, f"{kind} ended before it could be killed"
                if ready():
                    faults.sigkill(procs[kind])
                    del pending[kind]
            return not pending

        faults.wait_for("checkpoints to kill at", kill_the_ready)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    killed_at = {k.kind: faults.checkpoint_positions(runs[k.kind]["uri"])[-1] for k in KILLS}
    assert 10 <= killed_at["gan"]["step"] < faults.GAN_STEPS and killed_at["blocks"]["block"] >= 2
    for k in KILLS:
        assert not (tmp_path / k.kind / "result.json").exists()

    # the restarts (a KFP retry, or a rerun with the same run id), again side by side
    procs = {
        k.kind: faults.stage_process(
            k.kind, *runs[k.kind]["args"], env=runs[k.kind]["env"], log=tmp_path / f"{k.kind}-2.log"
        )
        for k in KILLS
    }
    # meanwhile: the same run id with another config is refused, and the checkpoint is left alone
    gan_run = runs["gan"]["env"]["DFKA_KFP_RUN_ID"]
    other = tmp_path / "other-ts"
    teachers = json.loads((Path(reference.teacher_set) / "teacher_set.json").read_text())["config"][
        "teachers"
    ]
    stages.ingest_teachers(teachers, str(other), amalgamation={**faults.METHOD, "seed": 1})
    ctx = RunContext(experiment="dfka-test", run_id=gan_run, bucket=stack_env.bucket, track=False)
    with pytest.raises(CheckpointError, match="was written for config"):
        stages.train_amalgamating_gan(str(other), str(tmp_path / "other-gan"), context=ctx)

    for k in KILLS:
        text = faults.finish(procs[k.kind], tmp_path / f"{k.kind}-2.log")
        assert procs[k.kind].returncode == 0, text[-3000:]
        assert "resuming from checkpoint" in text
        result = faults.result_of(tmp_path / k.kind)
        resumed = result["checkpoints"]["resumed_from"]
        assert (resumed["block"], resumed["step"]) == (killed_at[k.kind]["block"], killed_at[k.kind]["step"])
        steps = faults.GAN_STEPS if k.kind == "gan" else faults.BLOCK_STEPS
        assert result["report"]["steps"] == steps
        ref = reference.gan if k.kind == "gan" else reference.dual
        faults.assert_same_tensors(tmp_path / k.kind / k.weights, Path(ref) / k.weights)
        assert storage.listdir(runs[k.kind]["uri"]) == []  # a finished stage leaves no checkpoints behind
    faults.assert_same_samples(str(tmp_path / "gan" / "trajectory"), str(Path(reference.gan) / "trajectory"))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 256 KiB filesystem (tmpfs) that fills up; needs root (CI and the dev machine run as root)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from dfka.errors import StorageError

    monkeypatch.setattr(tempfile, "tempdir", str(small_disk))  # the staging file lands there too
    uri = str(small_disk / "c")
    ckpt = Checkpoints(uri, stage="s", config_hash="h", keep=2)
    ckpt.save({"box": Box(5)}, Position("gan", 5))
    big = Box(10)
    big.weights = torch.zeros(200_000)  # 800 KB: does not fit
    with pytest.raises(StorageError, match=r"could not write a checkpoint: No space left on device") as err:
        ckpt.save({"box": big}, Position("gan", 10))
    assert "(gan, step 5)" in err.value.problem and "is intact" in err.value.problem
    assert "free disk space" in err.value.fix and "resumes from the last good checkpoint" in err.value.fix
    restored = Box(0)
    at = Checkpoints(uri, stage="s", config_hash="h").restore({"box": restored})
    assert at is not None and at.step == 5 and torch.equal(restored.weights, Box(5).weights)
