"""dfka.tracking against the real MLflow server of the session stack, and its offline fallback."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from dfka import storage
from dfka.cli import main
from dfka.tracking import Tracker, clean_params, flatten, pending_offline, sync_offline

FAKE_SECRET = "fake-token-" + uuid.uuid4().hex


def _client(info):
    from mlflow.tracking import MlflowClient

    return MlflowClient(info.mlflow_uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "dfka.tracking" and r.levelno >= logging.WARNING
    ]


class Forwarder:
    """A real TCP hop in front of the server; ``cut()`` closes it, so the server becomes unreachable."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def cut(self) -> None:
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # also wakes the thread blocked in accept()
            s.close()


def test_params_are_flattened_redacted_and_truncated(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_SECRET)
    params = {
        "model": {"layers": [8, 16], "act": "relu"},
        "lr": 0.1,
        "db_password": "hunter2",
        "copy": FAKE_SECRET,
        "auth": {"api_token": "abc"},
        "url": f"http://u:{FAKE_SECRET}@host",
        "long": "x" * 7000,
        "empty": {},
        "unset": None,
        "labels": ["digit_0", "digit_1"],
        "tokens": [FAKE_SECRET],
    }
    cleaned = clean_params(params)
    assert cleaned["model.layers"] == "[8, 16]" and cleaned["labels"] == '["digit_0", "digit_1"]'
    assert cleaned["model.act"] == "relu" and cleaned["lr"] == "0.1"
    assert cleaned["db_password"] == cleaned["copy"] == cleaned["auth.api_token"] == "***"
    assert cleaned["url"] == "http://u:***@host"
    assert len(cleaned["long"]) == 6000
    assert cleaned["empty"] == cleaned["unset"] == ""  # unset is no value, not the word None
    assert all(FAKE_SECRET not in v for v in cleaned.values())
    assert flatten([{"a": 1}]) == {"0.a": 1} and flatten({"t": [{"a": 1}, 2]}) == {"t.0.a": 1, "t.1": 2}


@pytest.mark.integration
def test_parent_child_params_metrics_artifacts(stack_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", FAKE_SECRET)
    report = tmp_path / "report.txt"
    report.write_text("accuracy 0.9\n")
    with Tracker.start("dfka-test", "parent", tags={"stage": "unit"}) as parent:
        assert not parent.offline and parent.offline_path is None
        parent.log_params({"model": {"layers": [8, 16]}, "lr": 0.1, "db_password": "x", "copy": FAKE_SECRET})
        for step in range(5):
            parent({"loss": 1.0 / (step + 1), "acc": step / 10}, step)
        with parent.child("teacher-0", tags={"teacher": "0"}) as child:
            child.log_metrics({"kd": 0.5}, step=3)
        parent.set_tags({"result": "ok"})
        parent.log_artifact(report, "reports")
        parent.log_dict({"a": [1, 2]}, "config/cfg.json")
        parent.log_text("hello", "notes.txt")

    client = _client(stack_env)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == parent.experiment_id
    params = run.data.params
    assert params["model.layers"] == "[8, 16]" and params["lr"] == "0.1"
    assert params["db_password"] == params["copy"] == "***"
    assert all(FAKE_SECRET not in v for v in params.values())
    assert run.data.tags["stage"] == "unit" and run.data.tags["result"] == "ok"
    assert _history(client, parent.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]

    kid = client.get_run(child.run_id)
    assert kid.data.tags["mlflow.parentRunId"] == parent.run_id
    assert kid.info.status == "FINISHED" and _history(client, child.run_id, "kd") == [(3, 0.5)]

    from mlflow.artifacts import download_artifacts

    out = Path(
        download_artifacts(
            run_id=parent.run_id, dst_path=str(tmp_path / "dl"), tracking_uri=stack_env.mlflow_uri
        )
    )
    assert (out / "reports" / "report.txt").read_text() == "accuracy 0.9\n"
    assert json.loads((out / "config" / "cfg.json").read_text()) == {"a": [1, 2]}
    assert (out / "notes.txt").read_text() == "hello"
    # MLflow proxies artifacts into the SeaweedFS bucket started by the stack.
    stored = storage.listdir(f"s3://mlflow/artifacts/{parent.experiment_id}/{parent.run_id}")
    assert "artifacts/reports/report.txt" in stored


@pytest.mark.integration
def test_a_summary_value_does_not_draw_a_false_first_point(stack_env, monkeypatch, tmp_path):
    """A loop logs a curve at its steps, the stage then logs its summary without a step: MLflow must keep
    the curve as logged (a step-less value would be stored at step 0), online and through a sync."""

    def log(tracker: Tracker) -> None:
        tracker.log_metrics({"loss": 1.0}, step=25)
        tracker.log_metrics({"loss": 0.5}, step=50)
        tracker.log_metrics({"loss": 0.5, "seconds": 3.0})  # the stage's summary

    client = _client(stack_env)
    with Tracker.start("dfka-test", "curve") as online:
        log(online)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_dead_port()}")
    monkeypatch.setenv("DFKA_HOME", str(tmp_path))
    with Tracker.start("dfka-test", "curve-offline") as offline:
        log(offline)
    (synced,) = sync_offline(stack_env.mlflow_uri, home=tmp_path)
    for run_id in (online.run_id, synced.run_id):
        assert _history(client, run_id, "loss") == [(25, 1.0), (50, 0.5)]
        assert _history(client, run_id, "seconds") == [(0, 3.0)]  # a value with no curve keeps its place


@pytest.mark.integration
def test_the_registry_points_candidate_at_the_newest_and_best_at_the_highest(stack_env, tmp_path):
    """``best``: the highest union score among the versions scored on the newest version's test set."""
    import torch

    from dfka.stages.registry import log_targetnet, read_logged, register_evaluated

    client, name = _client(stack_env), f"dfka-test-{uuid.uuid4().hex[:6]}-targetnet"
    versions = []
    for i, (score, dataset) in enumerate(
        ((0.90, "mnist"), (0.95, "mnist"), (0.93, "mnist"), (0.5, "fashion"))
    ):
        with Tracker.start("dfka-test", "regroup") as tracker:
            out = str(tmp_path / f"targetnet-{i}")
            log_targetnet(torch.nn.Linear(4, 2), torch.rand(2, 4), tracker, stack_env.mlflow_uri, name, out)
        logged = read_logged(out)  # what the evaluation stage, another process, reads
        assert logged is not None and logged["run_id"] == tracker.run_id
        tags = {"score.union": f"{score}", "test.dataset": dataset}
        versions.append(register_evaluated(client, logged, tags, f"scored {score}"))
    assert [v["version"] for v in versions] == ["1", "2", "3", "4"]
    assert [v["aliases"] for v in versions] == [["candidate", "best"]] * 2 + [
        ["candidate"],
        ["candidate", "best"],
    ]
    assert client.get_model_version_by_alias(name, "candidate").version == "4"
    assert client.get_model_version(name, "3").description == "scored 0.93"
    assert client.get_model_version(name, "2").tags["score.union"] == "0.95"


@pytest.mark.integration
def test_exception_marks_run_failed(stack_env):
    with pytest.raises(RuntimeError), Tracker.start("dfka-test", "boom") as tracker:
        raise RuntimeError("training diverged")
    assert _client(stack_env).get_run(tracker.run_id).info.status == "FAILED"


@pytest.mark.integration
def test_dead_server_goes_offline_then_syncs(stack_env, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="dfka.tracking")
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\x00\x01" * 100)
    start = time.monotonic()
    with Tracker.start("dfka-offline", "parent", tracking_uri=f"http://127.0.0.1:{_dead_port()}") as parent:
        parent.log_params({"lr": 0.01, "nested": {"k": 2}})
        for step in range(3):
            parent({"loss": 3.0 - step}, step)
        with parent.child("child") as child:
            child.log_metrics({"acc": 0.7}, step=2)
            child.log_artifact(data, "ckpt")
        parent.log_dict({"epochs": 3}, "config.json")
    assert time.monotonic() - start < 10
    assert parent.offline and child.offline and parent.run_id is None
    assert parent.offline_path.is_relative_to(os.environ["DFKA_HOME"])
    assert parent.offline_path.is_file() and parent.offline_path.parent.name == "dfka-offline"
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(parent.offline_path) in warnings[0]
    kinds = [json.loads(line)["kind"] for line in parent.offline_path.read_text().splitlines()]
    assert kinds == ["run", "params", "metrics", "metrics", "metrics", "artifact", "end"]
    child_head = json.loads(child.offline_path.read_text().splitlines()[0])
    assert child_head["parent_local_id"] == parent.local_id

    assert main(["tracking", "status"]) == 0
    assert "dfka-offline" in capsys.readouterr().out

    results = sync_offline(stack_env.mlflow_uri)
    assert [(r.run_name, r.status) for r in results] == [("parent", "synced"), ("child", "synced")]
    client = _client(stack_env)
    run_id, child_id = results[0].run_id, results[1].run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01", "nested.k": "2"}
    assert _history(client, run_id, "loss") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    kid = client.get_run(child_id)
    assert kid.data.tags["mlflow.parentRunId"] == run_id and _history(client, child_id, "acc") == [(2, 0.7)]
    assert [a.path for a in client.list_artifacts(child_id, "ckpt")] == ["ckpt/weights.bin"]
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.json"]

    assert sync_offline(stack_env.mlflow_uri) == [] and pending_offline() == []
    assert main(["tracking", "sync"]) == 0
    assert "nothing to sync" in capsys.readouterr().out


@pytest.mark.integration
def test_server_dying_mid_run_keeps_the_run(stack_env, caplog):
    caplog.set_level(logging.INFO, logger="dfka.tracking")
    hop = Forwarder(int(stack_env.mlflow_uri.rsplit(":", 1)[1]))
    tracker = Tracker.start("dfka-test", "flaky", tracking_uri=f"http://127.0.0.1:{hop.port}")
    tracker.log_metrics({"loss": 1.0}, step=0)
    assert not tracker.offline
    hop.cut()
    start = time.monotonic()
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.log_metrics({"loss": 0.25}, step=2)
    tracker.end()
    assert time.monotonic() - start < 10
    assert tracker.offline and len(_warnings(caplog)) == 1

    results = sync_offline(stack_env.mlflow_uri)
    assert [(r.run_id, r.status) for r in results] == [(tracker.run_id, "synced")]  # same run, resumed
    client = _client(stack_env)
    assert _history(client, tracker.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_no_tracking_uri_records_offline(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DFKA_HOME", str(tmp_path))
    with Tracker.start("local", "run") as tracker:
        tracker.log_metrics({"x": 1}, step=0)
    assert tracker.offline_path == tmp_path / "offline-runs" / "local" / f"{tracker.local_id}.jsonl"
    assert "dfka stack up" in _warnings(caplog)[0]
    assert [r.finished for r in pending_offline()] == [True]


@pytest.mark.integration
def test_rejected_record_does_not_switch_offline(stack_env, caplog):
    with Tracker.start("dfka-test", "changed-param") as tracker:
        tracker.log_params({"lr": 0.1})
        tracker.log_params({"lr": 0.2})  # MLflow params are immutable: the server refuses the change
        tracker.log_metrics({"loss": 1.0}, step=0)
    assert not tracker.offline
    assert any("rejected params" in w for w in _warnings(caplog))
    client = _client(stack_env)
    assert client.get_run(tracker.run_id).data.params == {"lr": "0.1"}
    assert _history(client, tracker.run_id, "loss") == [(0, 1.0)]
