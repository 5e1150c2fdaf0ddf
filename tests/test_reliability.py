"""Object-store and MLflow faults during a real training stage (issue #7, parts 4 and 5).

Each test starts its own server on free ports in a private home (never the session stack, which other
tests share), runs the GAN stage as a process of its own (the KFP component's code), and stops the
server mid-stage for real: SeaweedFS back within the retry window, SeaweedFS gone for good, MLflow gone.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from dfka.cli import main as cli
from dfka.engine.checkpoint import Checkpoints
from dfka.ops.stack import StackPorts, credentials, stack_down, stack_up
from tests import faults

STAGE = "train-amalgamating-gan"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> faults.ToyRun:
    return faults.toy_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture
def private_store(stack_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A SeaweedFS of this test's own (MLflow stays the session's); stopped at the end whatever happens."""
    home, ports = tmp_path / "store", StackPorts.free()
    access, secret = credentials(home)
    monkeypatch.setenv("DFKA_S3_ENDPOINT", f"http://127.0.0.1:{ports.s3}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    info = stack_up(home, ports)
    assert info.started == ["seaweedfs"]
    try:
        yield home, ports, info
    finally:
        stack_down(home)


def _copy_mlflow_db(src: Path, dest: Path) -> None:
    """A consistent copy (sqlite backup API) of a stack's MLflow database and its migration marker."""
    dest.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(src / "mlflow.db")) as a, closing(sqlite3.connect(dest / "mlflow.db")) as b:
        a.backup(b)
    shutil.copy(src / "mlflow.db.version", dest / "mlflow.db.version")


def _last_good(text: str) -> tuple[int, str]:
    m = re.search(r"the last good checkpoint \(gan, step (\d+)\) at (s3://\S+) is intact", text)
    assert m, text[-3000:]
    return int(m.group(1)), m.group(2)


@pytest.mark.integration
def test_store_outage_one_stage_rides_it_out_the_other_fails_and_resumes(
    private_store, reference, tmp_path: Path
) -> None:
    """SeaweedFS stops during two GAN stages (two runs). It comes back within the retry window of one
    (``DFKA_S3_RETRIES=8``: ~40 s of backoff) but not of the other (``=2``: ~2 s): the first goes on
    without losing a step; the second fails with a clear error, its last good checkpoint intact, and a
    restart once the store is back resumes from that checkpoint."""
    home, ports, info = private_store
    runs = {}
    for name, retries in (("patient", "8"), ("impatient", "2")):
        run_id = f"test-store-{name}-{uuid.uuid4().hex[:6]}"
        env = {"DFKA_KFP_RUN_ID": run_id, "DFKA_CHECKPOINT_EVERY": "5", "DFKA_S3_RETRIES": retries}
        runs[name] = {
            "run_id": run_id,
            "env": env,
            "uri": f"s3://{info.bucket}/runs/{run_id}/{STAGE}/checkpoints",
            "out": tmp_path / name,
            "log": tmp_path / f"{name}.log",
        }
    procs = {
        name: faults.stage_process(
            "gan", reference.teacher_set, str(r["out"]), env=r["env"], log=r["log"], step_seconds=0.08
        )
        for name, r in runs.items()
    }
    try:
        for name, r in runs.items():
            first = faults.checkpoint_at(r["uri"], lambda p: p["step"] >= 5)
            faults.wait_for(f"the first checkpoint of {name}", first, procs[name])
        stack_down(home)  # the object store is gone: connection refused
        impatient = faults.finish(procs["impatient"], runs["impatient"]["log"])
        faults.wait_for(
            "retries", lambda: "retry 1/8" in runs["patient"]["log"].read_text(), procs["patient"]
        )
        stack_up(home, ports)  # back, with its data
        patient = faults.finish(procs["patient"], runs["patient"]["log"])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()

    # back in time: the stage went on, nothing lost, same weights as an uninterrupted run
    assert procs["patient"].returncode == 0, patient[-3000:]
    r = runs["patient"]
    assert re.search(
        rf"(put|list) s3://{info.bucket}/runs/{r['run_id']}/\S+ on {info.s3_endpoint} failed", patient
    )
    result = faults.result_of(r["out"])
    assert result["checkpoints"]["resumed_from"] is None  # the same attempt went on
    assert result["published"] == f"s3://{info.bucket}/runs/{r['run_id']}/{STAGE}"
    faults.assert_same_tensors(r["out"] / "gan.safetensors", Path(reference.gan) / "gan.safetensors")

    # not back in time: a clear error naming the endpoint and the checkpoint a restart resumes from
    assert procs["impatient"].returncode != 0
    r = runs["impatient"]
    error = impatient[impatient.rindex("StorageError") :]
    assert f"{STAGE}: could not write a checkpoint: could not reach the object store" in error
    assert info.s3_endpoint in error and "after 3 attempts" in error
    assert "up? `dfka stack status`" in error
    assert "resumes from the last good checkpoint" in error
    step, where = _last_good(error)
    assert where.startswith(r["uri"]) and 5 <= step < faults.GAN_STEPS
    assert not (r["out"] / "result.json").exists()
    for text in (patient, impatient):
        assert info.secret_key not in text and info.access_key not in text

    # the last good checkpoint is in the store, complete and verified ...
    config_hash = json.loads((Path(reference.teacher_set) / "teacher_set.json").read_text())["config_hash"]
    latest = Checkpoints(r["uri"], stage=STAGE, config_hash=config_hash).latest()
    assert latest is not None and latest.manifest["position"]["step"] == step
    # ... and the restarted stage resumes from it to the same weights as an uninterrupted run
    retry = faults.stage_process(
        "gan", reference.teacher_set, str(r["out"]), env=r["env"], log=tmp_path / "retry.log"
    )
    text = faults.finish(retry, tmp_path / "retry.log")
    assert retry.returncode == 0, text[-3000:]
    assert faults.result_of(r["out"])["checkpoints"]["resumed_from"]["step"] == step
    faults.assert_same_tensors(r["out"] / "gan.safetensors", Path(reference.gan) / "gan.safetensors")


@pytest.mark.integration
def test_mlflow_down_mid_stage_keeps_the_metrics_and_syncs_them(
    stack_env, reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # an MLflow of this test's own (artifacts in the session's SeaweedFS); the session's stays up. It
    # starts from a copy of the session's migrated database, which skips `mlflow db upgrade` (~5-10 s).
    home, ports = tmp_path / "mlflow", StackPorts.free()
    _copy_mlflow_db(stack_env.home / "stack", home / "stack")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    info = stack_up(home, ports)
    assert info.started == ["mlflow"]
    experiment = f"dfka-test-mlflow-down-{uuid.uuid4().hex[:6]}"
    dfka_home = tmp_path / "dfka-home"
    env = {
        "DFKA_KFP_RUN_ID": f"test-mlflow-down-{uuid.uuid4().hex[:6]}",
        "MLFLOW_TRACKING_URI": info.mlflow_uri,
        "DFKA_HOME": str(dfka_home),
        "DFKA_TEST_EXPERIMENT": experiment,
        "DFKA_CHECKPOINT_EVERY": "5",
    }
    uri = f"s3://{stack_env.bucket}/runs/{env['DFKA_KFP_RUN_ID']}/{STAGE}/checkpoints"
    out, log = tmp_path / "gan", tmp_path / "stage.log"
    try:
        proc = faults.stage_process(
            "gan", reference.teacher_set, str(out), env=env, log=log, step_seconds=0.1
        )
        faults.wait_for("the first checkpoint", faults.checkpoint_at(uri, lambda p: p["step"] >= 5), proc)
        assert stack_down(home) == ["mlflow"]  # the tracking server is gone mid-stage
        faults.wait_for("the stage to go offline", lambda: "Recording to" in log.read_text(), proc)
        stack_up(home, ports)  # restarts while the stage finishes (it stays offline: one switch per run)
        text = faults.finish(proc, log)
        assert proc.returncode == 0, text[-3000:]

        # the stage completed; its metrics are in the offline file that the result and the log name
        result = faults.result_of(out)
        offline = Path(result["tracking_offline"])
        assert offline.is_file() and offline.is_relative_to(dfka_home)
        assert f"this stage's params and metrics are kept in {offline}" in text
        assert "dfka tracking sync" in text
        records = [json.loads(line) for line in offline.read_text().splitlines()]
        run_id = records[0]["run_id"]
        assert run_id == result["mlflow_run_id"]  # the run started online; the rest went to the file
        kept = {k for r in records if r["kind"] == "metrics" for k in r["metrics"]}
        assert {"stage.steps", "stage.wall_seconds", "gan.loss"} <= kept
        assert (records[-1]["kind"], records[-1]["status"]) == ("end", "FINISHED")

        # the server is back: `dfka tracking sync` uploads them into the same run
        monkeypatch.setenv("DFKA_HOME", str(dfka_home))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", info.mlflow_uri)
        assert cli(["tracking", "sync"]) == 0
        assert f"synced   {experiment}/{STAGE}: {run_id}" in capsys.readouterr().out
        from mlflow.tracking import MlflowClient

        client = MlflowClient(info.mlflow_uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics["stage.steps"] == faults.GAN_STEPS
        loss = client.get_metric_history(run_id, "gan.loss")
        assert max(m.step for m in loss) == faults.GAN_STEPS  # the last curve point, logged while offline
        assert not offline.exists()  # moved to synced/
    finally:
        stack_down(home)


@pytest.mark.parametrize("offline", [None, "/home/u/.dfka/offline-runs/dfka/20261122-1.jsonl"])
def test_closing_report_names_the_offline_files(offline: str | None) -> None:
    from pipelines.run_local import render

    stage = {"seconds": 1.0, "process_seconds": 2.0, "loop_seconds": 0.5, "tracking_offline": offline}
    summary = {"stages": {STAGE: stage}, "seconds": 3.0, "bucket": "s3://dfka/runs/r/"}
    text = render(summary)
    assert ("metrics are kept in" in text) == bool(offline)
    if offline:
        assert offline in text and "dfka tracking sync" in text


def test_closing_block_says_the_verdict_and_links_a_browser_can_open() -> None:
    from pipelines.run_local import render

    stage = {"seconds": 1.0, "process_seconds": 2.0, "loop_seconds": 0.5}
    verdict = "TargetNet (lenet5:1.0) 94.98% accuracy on the mnist test split: 0.998 × the ensemble"
    summary = {
        "stages": {STAGE: stage},
        "seconds": 3.0,
        "bucket": "s3://dfka/runs/r/",
        "s3_endpoint": "http://127.0.0.1:8333",
        "results": {"dataset": "mnist"},
        "verdict": verdict,
    }
    lines = render(summary).splitlines()
    assert verdict in lines
    assert "browse:  http://127.0.0.1:8336/buckets/dfka/runs/r/" in lines  # the filer, not S3's 403
    assert "report:  http://127.0.0.1:8336/buckets/dfka/runs/r/evaluate/report.html" in lines
    remote = render({**summary, "s3_endpoint": "https://s3.example.com"}).splitlines()
    assert not any(line.startswith("browse:") for line in remote)
    assert "report:  s3://dfka/runs/r/evaluate/report.html" in remote


def test_stage_log_files_get_no_colour_codes() -> None:
    import io

    from pipelines.run_local import _Progress

    log, terminal = io.StringIO(), io.StringIO()  # a file, and a terminal that is not a TTY (CI, a pipe)
    out = _Progress(log, terminal)
    out.write("11:08:19.455 - INFO - Executing task \x1b[96m'ingest-teachers'\x1b[0m\nplain line\n")
    assert "\x1b[" not in log.getvalue() and "plain line" in log.getvalue()
    assert terminal.getvalue() == "11:08:19.455 - INFO - Executing task 'ingest-teachers'\n"
