"""Shared machinery of the fault-injection tests: a toy teacher set, its uninterrupted reference
outputs, stage processes that can be killed, and waiting for checkpoints in the real object store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dfka import stages, storage
from dfka.amalgamation.samples import read_bank
from dfka.engine.checkpoint import MANIFEST
from tests.test_stages import toy_bundles

ROOT = Path(__file__).resolve().parents[1]
GAN_STEPS = 40
BLOCK_STEPS = 36  # 12 per block (3 blocks)
METHOD = {
    "student": "lenet5:0.5",
    "device": "cpu",
    "threads": 1,  # bit-for-bit checks: both sides at one thread, whatever OMP_NUM_THREADS the caller has
    "gan": {"batch_size": 16, "budget": {"steps": GAN_STEPS}, "widths": 8},
    "export": {"samples": 200, "shard_size": 80},
    "blocks": {"batch_size": 16, "budget": {"steps": BLOCK_STEPS}},
}


@dataclass
class ToyRun:
    """A teacher set and the outputs of an uninterrupted chain (the reference for bit-exact checks)."""

    teacher_set: str
    gan: str
    export: str
    dual: str


def toy_run(root: Path, method: dict[str, Any] | None = None) -> ToyRun:
    """The uninterrupted reference, at the stage processes' one thread: GEMM reductions split by thread
    count, so bit-for-bit comparisons need the same count on both sides."""
    ts = str(root / "ts")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages.ingest_teachers(toy_bundles(root), ts, amalgamation=method or METHOD)
        gan, export, dual = (str(root / n) for n in ("ref-gan", "ref-export", "ref-dual"))
        stages.train_amalgamating_gan(ts, gan)
        stages.export_synthetic_samples(ts, gan, export)
        stages.train_dual_generator_blocks(ts, export, dual)
    finally:
        torch.set_num_threads(threads)
    return ToyRun(ts, gan, export, dual)


def stage_process(
    stage: str, *paths: str, env: dict[str, str], log: Path, step_seconds: float = 0.0
) -> subprocess.Popen:
    """Start ``python -m tests.stage_process`` (the component's code path) with ``env`` on top of ours."""
    full = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "DFKA_TEST_STEP_SECONDS": str(step_seconds),
        **env,
    }
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.stage_process", stage, *paths],
            cwd=ROOT,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()


def wait_for(
    what: str, check: Callable[[], Any], proc: subprocess.Popen | None = None, timeout: float = 60
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None and value is not False:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the stage process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_positions(uri: str) -> list[dict[str, Any]]:
    """Positions of the complete checkpoints under ``uri``, oldest first."""
    names = sorted(n for n in storage.listdir(uri) if n.endswith(MANIFEST))
    return [json.loads(storage.get_bytes(storage.join(uri, n)))["position"] for n in names]


def checkpoint_at(uri: str, accept: Callable[[dict[str, Any]], bool]) -> Callable[[], dict | None]:
    def check() -> dict[str, Any] | None:
        try:
            return next((p for p in reversed(checkpoint_positions(uri)) if accept(p)), None)
        except Exception:  # the prefix may be mid-write; try again
            return None

    return check


def sigkill(proc: subprocess.Popen) -> None:
    """SIGKILL the stage process: no cleanup, no atexit, no finally blocks run."""
    assert proc.poll() is None, "the stage finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_same_tensors(a: str | Path, b: str | Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert set(left) == set(right)
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_samples(a: str, b: str) -> None:
    left, right = read_bank(a), read_bank(b)
    assert set(left.tensors) == set(right.tensors)
    for key in left.tensors:
        assert torch.equal(left.tensors[key], right.tensors[key]), key


def result_of(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "result.json").read_text())
