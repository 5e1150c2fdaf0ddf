"""dfka.storage against a real SeaweedFS (the session stack), plus local paths."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from minio import Minio

from dfka import storage
from dfka.errors import StorageError
from dfka.ops.stack import StackPorts, credentials, stack_down, stack_up

MiB = 1024 * 1024


@pytest.fixture
def prefix(stack_env) -> str:
    return f"s3://{stack_env.bucket}/tests/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Record backoff pauses (and shorten them) so tests can see whether a call was retried."""
    recorded: list[float] = []

    def sleep(seconds: float) -> None:
        recorded.append(seconds)
        time.sleep(min(seconds, 0.3))

    monkeypatch.setattr(
        storage, "retry_policy", storage.RetryPolicy(retries=30, base=0.2, cap=0.5, sleep=sleep)
    )
    return recorded


def _raw_client(info) -> Minio:
    return Minio(info.s3_endpoint.split("://")[1], info.access_key, info.secret_key, secure=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.integration
def test_bytes_roundtrip_exists_list_remove(prefix):
    uri = storage.join(prefix, "a", "b.bin")
    assert not storage.exists(uri)
    storage.put_bytes(b"hello dfka", uri)
    assert storage.get_bytes(uri) == b"hello dfka"
    assert storage.exists(uri) and storage.exists(storage.join(prefix, "a"))
    assert storage.listdir(prefix) == ["a/b.bin"]
    storage.remove(uri)
    assert not storage.exists(uri)
    assert storage.listdir(prefix) == []


@pytest.mark.integration
def test_remove_takes_a_prefix_past_one_delete_batch_and_nothing_beside_it(prefix):
    """1,001 objects: more than one DeleteObjects request (1,000 keys each); a sibling whose name only
    starts like the folder stays."""
    folder = storage.join(prefix, "run")
    for i in range(1001):
        storage.put_bytes(b"x", storage.join(folder, f"{i:04d}.bin"))
    storage.put_bytes(b"keep", storage.join(prefix, "run2", "k.bin"))
    storage.put_bytes(b"keep", storage.join(prefix, "run.bin"))
    storage.remove(folder)
    assert storage.listdir(prefix) == ["run.bin", "run2/k.bin"]
    storage.remove(storage.join(prefix, "gone"))  # a missing target is not an error


@pytest.mark.integration
def test_dir_roundtrip(prefix, tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "sub" / "x.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "deeper" / "y.json").write_text("{}")
    storage.put_dir(src, prefix)
    assert storage.listdir(prefix) == ["sub/deeper/y.json", "sub/x.bin", "top.txt"]
    assert storage.listdir(prefix, recursive=False) == ["sub/", "top.txt"]
    storage.get_dir(prefix, tmp_path / "back")
    assert _tree(tmp_path / "back") == _tree(src)
    storage.remove(prefix)
    assert storage.listdir(prefix) == []
    with pytest.raises(StorageError, match="does not exist"):
        storage.get_dir(prefix, tmp_path / "again")


@pytest.mark.integration
def test_large_object_is_multipart_and_intact(prefix, stack_env, tmp_path):
    data = os.urandom(40 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = storage.join(prefix, "big.bin")
    storage.put_file(src, uri)
    bucket, key = uri[5:].split("/", 1)
    st = _raw_client(stack_env).stat_object(bucket, key)
    assert st.etag.endswith("-5")  # five 8 MiB parts
    assert st.metadata["x-amz-meta-sha256"] == hashlib.sha256(data).hexdigest()
    dest = tmp_path / "out" / "big.bin"
    storage.get_file(uri, dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # no temp file left behind


@pytest.mark.integration
def test_tampered_object_is_detected(prefix, stack_env, tmp_path):
    uri = storage.join(prefix, "model.safetensors")
    storage.put_bytes(b"original weights", uri)
    bucket, key = uri[5:].split("/", 1)
    forged = {"sha256": hashlib.sha256(b"original weights").hexdigest()}
    _raw_client(stack_env).put_object(bucket, key, io.BytesIO(b"evil weights!!!!"), 16, metadata=forged)
    with pytest.raises(StorageError) as err:
        storage.get_bytes(uri)
    assert key in str(err.value) and "corrupt" in str(err.value) and "outside dfka" in str(err.value)
    dest = tmp_path / "model.safetensors"
    with pytest.raises(StorageError):
        storage.get_file(uri, dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_missing_key_fails_fast_without_retries(prefix, sleeps):
    uri = storage.join(prefix, "nope.bin")
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.get_bytes(uri)
    assert time.monotonic() - start < 2
    assert sleeps == []
    assert "does not exist" in err.value.problem and "nope.bin" in err.value.problem
    assert err.value.fix == "the key does not exist: check the URI"


@pytest.mark.integration
def test_wrong_secret_is_clear_and_not_leaked(prefix, stack_env, monkeypatch, sleeps):
    wrong = "not-the-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(StorageError) as err:
        storage.put_bytes(b"x", storage.join(prefix, "x"))
    message = str(err.value)
    assert stack_env.s3_endpoint in message and "AWS_SECRET_ACCESS_KEY" in message
    assert wrong not in message and stack_env.secret_key not in message
    assert sleeps == []


def test_missing_settings_say_how_to_fix(monkeypatch):
    for key in (*storage.ENDPOINT_KEYS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(StorageError) as err:
        storage.get_bytes("s3://dfka/x")
    assert "dfka stack up" in err.value.fix


@pytest.mark.integration
def test_put_retries_until_a_late_server_is_up(stack_env, tmp_path, monkeypatch, sleeps, caplog):
    """A real outage: nothing listens on the port until a second SeaweedFS starts 1.5 s later."""
    home, ports = tmp_path / "late", StackPorts.free()
    access, secret = credentials(home)
    monkeypatch.setenv("DFKA_S3_ENDPOINT", f"http://127.0.0.1:{ports.s3}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # MLFLOW_TRACKING_URI stays: MLflow is "external"
    errors: list[BaseException] = []

    def start_late() -> None:
        time.sleep(1.5)
        try:
            stack_up(home, ports)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=start_late)
    try:
        thread.start()
        caplog.set_level(logging.WARNING, logger="dfka.storage")
        start = time.monotonic()
        storage.put_bytes(b"made it", "s3://late/key.txt")
        assert time.monotonic() - start >= 1.5
        thread.join()
        assert errors == []
        assert storage.get_bytes("s3://late/key.txt") == b"made it"
        retries = [r for r in caplog.records if r.name == "dfka.storage" and "retry" in r.getMessage()]
        assert len(sleeps) >= 2 and len(retries) >= len(sleeps)
        assert all(secret not in r.getMessage() for r in caplog.records)
    finally:
        thread.join()
        stack_down(home)


def test_local_paths_roundtrip(tmp_path):
    storage.put_bytes(b"abc", tmp_path / "deep" / "a.bin")
    assert storage.get_bytes(f"file://{tmp_path}/deep/a.bin") == b"abc"
    storage.put_file(tmp_path / "deep" / "a.bin", storage.join(str(tmp_path), "copy", "b.bin"))
    storage.get_file(tmp_path / "copy" / "b.bin", tmp_path / "got" / "c.bin")
    assert (tmp_path / "got" / "c.bin").read_bytes() == b"abc"
    storage.put_dir(tmp_path / "deep", tmp_path / "tree")
    storage.get_dir(tmp_path / "tree", tmp_path / "tree2")
    assert storage.listdir(tmp_path / "tree2") == ["a.bin"]
    assert storage.listdir(tmp_path, recursive=False) == ["copy/", "deep/", "got/", "tree/", "tree2/"]
    assert storage.exists(tmp_path / "tree2" / "a.bin")
    storage.remove(tmp_path / "tree2")
    storage.remove(tmp_path / "copy" / "b.bin")
    assert not storage.exists(tmp_path / "tree2") and not storage.exists(tmp_path / "copy" / "b.bin")
    assert [p.name for p in tmp_path.rglob(".*")] == []  # atomic writes leave no temp files
    with pytest.raises(StorageError, match="does not exist"):
        storage.get_bytes(tmp_path / "missing")


def test_join_and_is_s3():
    assert storage.join("s3://b/run/", "/x/", "y.bin") == "s3://b/run/x/y.bin"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/tmp/a", "b", "c") == "/tmp/a/b/c"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3(Path("s3:/x"))
