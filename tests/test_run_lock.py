"""One local runner per run id, and `dfka pipeline run --run-id X` resuming after SIGTERM or SIGKILL.

Real processes and signals throughout; the end-to-end case runs the real pipeline (kfp.local) against
the real SeaweedFS + MLflow stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from dfka.errors import DfkaError
from dfka.ops.run_lock import RunLocked, check_run_id, processes_with_env, run_lock, stop_leftovers
from tests.test_stages import tiny_mnist_teacher

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [f"digit_{i}" for i in range(10)]
HOLD = (
    "import sys, time; from pathlib import Path; from dfka.ops.run_lock import run_lock\n"
    "with run_lock(Path(sys.argv[1]), 'r1'):\n    print('held', flush=True); time.sleep(120)\n"
)


def _holder(home: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(home)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_second_runner_is_refused_while_the_first_lives_and_proceeds_once_it_died(
    tmp_path: Path, sig: signal.Signals
) -> None:
    holder = _holder(tmp_path)
    try:
        with (
            pytest.raises(RunLocked, match=rf"run r1 is already running \(pid {holder.pid} on ") as err,
            run_lock(tmp_path, "r1"),
        ):
            pass
        assert f"kill {holder.pid}" in str(err.value.fix) and "another --run-id" in str(err.value.fix)
        with run_lock(tmp_path, "r2"):  # other run ids are independent
            pass
    finally:
        holder.send_signal(sig)
        holder.wait(10)
    with run_lock(tmp_path, "r1") as path:  # the dead holder's lock is gone with it: no stale lock
        assert str(os.getpid()) in path.read_text()


def test_leftover_processes_of_a_run_are_found_by_their_run_id_and_stopped() -> None:
    run_id = f"t-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DFKA_KFP_RUN_ID": run_id}
    stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.monotonic() + 10
        while stage.pid not in processes_with_env("DFKA_KFP_RUN_ID", run_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stop_leftovers("DFKA_KFP_RUN_ID", run_id) == [stage.pid]
        assert stage.wait(10) == -signal.SIGTERM
        assert other.poll() is None  # a process of another run (or none) is left alone
    finally:
        for p in (stage, other):
            p.kill()
            p.wait()


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "x" * 101, "a..b", "run id"])
def test_unsafe_run_ids_are_refused(bad: str) -> None:
    with pytest.raises(DfkaError, match="not a safe name"):
        check_run_id(bad)
    assert check_run_id("local-20261206-abc_1.2") == "local-20261206-abc_1.2"


# --- the real runner ------------------------------------------------------------------------------


class _Runner:
    """``dfka pipeline run`` in a subprocess, its output collected line by line."""

    def __init__(self, config: Path, run_id: str, cwd: Path):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dfka.cli",
                "pipeline",
                "run",
                "--config",
                str(config),
                "--run-id",
                run_id,
            ],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "".join(self.lines[-40:])
            assert time.monotonic() < deadline, f"no {text!r} in:\n" + "".join(self.lines[-40:])
            time.sleep(0.1)

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.mark.integration
@pytest.mark.slow
def test_killed_local_runs_resume_with_the_same_command(stack_env, tmp_path: Path) -> None:
    """SIGTERM during the GAN, SIGKILL during block training, then the same command finishes the run;
    a concurrent runner of the same id is refused in one line meanwhile."""
    bucket = stack_env.bucket
    teachers = [
        tiny_mnist_teacher(DIGITS[:5], f"s3://{bucket}/teachers/kill/lo", "lo", seed=1),
        tiny_mnist_teacher(DIGITS[5:], f"s3://{bucket}/teachers/kill/hi", "hi", seed=2),
    ]
    config = tmp_path / "kill.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": f"dfka-kill-{uuid.uuid4().hex[:6]}",
                "teachers": teachers,
                "target_labels": "digit_0..digit_9",
                "evaluation": {"dataset": "mnist"},
                "amalgamation": {
                    "student": "lenet5:0.25",
                    "device": "cpu",
                    "gan": {"batch_size": 32, "budget": {"steps": 400}, "widths": 8},
                    "export": {"samples": 320, "shard_size": 128},
                    "blocks": {"batch_size": 32, "budget": {"steps": 600}},
                    "regroup": {"finetune": {"steps": 12}},
                },
                "pipeline": {"local_root": str(tmp_path / "kfp"), "threads": 1, "checkpoint_every": 50},
            }
        )
    )
    run_id = f"kill-{uuid.uuid4().hex[:6]}"

    first = _Runner(config, run_id, ROOT)
    first.wait_for("train-amalgamating-gan")
    time.sleep(2)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish(60) != 0
    time.sleep(1)
    assert processes_with_env("DFKA_KFP_RUN_ID", run_id) == []  # SIGTERM took its stage down with it

    second = _Runner(config, run_id, ROOT)
    second.wait_for("train-dual-generator-blocks")
    time.sleep(2)
    second.proc.send_signal(signal.SIGKILL)  # no clean-up at all: scratch folder, runner, stage orphaned
    second.finish(60)

    third = _Runner(config, run_id, ROOT)
    third.wait_for("dfka pipeline: run")
    time.sleep(1)
    rival = subprocess.run(
        [sys.executable, "-m", "dfka.cli", "pipeline", "run", "--config", str(config), "--run-id", run_id],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rival.returncode == 2, rival.stdout + rival.stderr
    err = rival.stderr.strip().splitlines()
    assert (
        err[-2].startswith(f"error: run {run_id} is already running (pid ")
        and "Traceback" not in rival.stderr
    )
    assert err[-1].strip().startswith("fix: wait for it to finish")
    assert third.finish() == 0, third.output[-4000:]
    assert "| TargetNet (lenet5:0.25) |" in third.output
    assert not (tmp_path / "kfp" / f".tmp-{run_id}").exists()
    assert processes_with_env("DFKA_KFP_RUN_ID", run_id) == []
