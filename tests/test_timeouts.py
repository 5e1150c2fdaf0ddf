"""Endpoints that accept TCP and never answer: S3, MLflow and KFP calls fail in DFKA_NETWORK_TIMEOUT,
naming the endpoint, as one error/fix pair (issue #15). A real listening socket that never replies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dfka import storage
from dfka.errors import ConfigError, StorageError
from dfka.settings import network_timeout
from dfka.tracking import apply_http_defaults

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def blackhole() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` whose kernel completes every TCP handshake and nobody ever reads."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_an_unanswering_object_store_fails_within_the_network_timeout(
    blackhole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DFKA_S3_ENDPOINT", blackhole)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("DFKA_NETWORK_TIMEOUT", "2")
    monkeypatch.setattr(storage, "_http", None)  # the pool reads the timeout when it is built
    monkeypatch.setattr(storage, "_known_buckets", set())
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.put_bytes(b"x", "s3://dfka/probe/x")
    took = time.monotonic() - started
    assert 1.5 < took < 6, took
    assert blackhole.removeprefix("http://") in err.value.problem and "could not reach" in err.value.problem
    assert "DFKA_NETWORK_TIMEOUT, now 2 s" in err.value.fix


def test_the_network_timeout_setting_is_checked_and_reaches_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFKA_NETWORK_TIMEOUT", raising=False)
    assert network_timeout() == 30.0
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    apply_http_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "15"  # two tries of 15 s: about 30 s in all
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    for bad in ("soon", "-1", "0", "inf", "nan"):
        monkeypatch.setenv("DFKA_NETWORK_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="DFKA_NETWORK_TIMEOUT"):
            network_timeout()


@pytest.mark.parametrize("kind", ["unanswering", "closed"])
def test_submit_to_an_unreachable_kfp_host_is_one_error_line_naming_it(blackhole: str, kind: str) -> None:
    if kind == "closed":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            host = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there any more
    else:
        host = blackhole
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfka.cli",
            "pipeline",
            "submit",
            "--host",
            host,
            "--config",
            "configs/demo.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DFKA_NETWORK_TIMEOUT": "2"},
    )
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "  fix:"))]
    assert len(lines) == 2, proc.stderr
    assert (
        lines[0].startswith(f"error: the KFP API at {host} does not answer")
        and "fix: check --host" in lines[1]
    )
    assert took < 30, took
