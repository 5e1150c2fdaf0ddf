"""One local runner per run id, and recovery from a runner that was killed.

``dfka pipeline run --run-id X`` holds an exclusive ``flock`` on ``$DFKA_HOME/locks/run-X.lock`` for as
long as it runs. The kernel drops the lock when the process dies, however it dies (SIGKILL included), so
a stale lock cannot exist: a second runner with the same id is refused while the first lives, and
proceeds at once after it died. The lock file names the holder (pid, host, start time) for the message.

What a killed runner can leave behind is its stage processes (kfp.local starts each stage as a child;
SIGKILL of the runner does not reach them). Every stage inherits the run id in its environment, so the
next runner of that id finds them (psutil) and stops them before it resumes, instead of racing them
over the same checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from dfka.errors import DfkaError

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 10.0
#: a run id names a lock file and an S3 prefix (runs/<id>/): one safe path part
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class RunLocked(DfkaError):
    """Another live runner holds this run id."""


def check_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise DfkaError(
            f"run id {run_id!r} is not a safe name",
            "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. local-test-1)",
        )
    return run_id


def lock_path(home: Path, run_id: str) -> Path:
    return home / "locks" / f"run-{run_id}.lock"


@contextlib.contextmanager
def run_lock(home: Path, run_id: str) -> Iterator[Path]:
    """Hold the run id's lock for the ``with`` block; refuse with :class:`RunLocked` if it is held."""
    path = lock_path(home, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _holder(path)
            raise RunLocked(
                f"run {run_id} is already running ({holder})",
                f"wait for it to finish, or stop it (kill {holder.split()[1] if holder.startswith('pid ') else 'it'}) "
                "and run the same command again to resume; a new run needs another --run-id",
            ) from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.write(fd, json.dumps(record).encode())
        yield path
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it would race a waiting runner)


def _holder(path: Path) -> str:
    try:
        rec = json.loads(path.read_text() or "{}")
        return f"pid {rec['pid']} on {rec['host']}, since {time.strftime('%H:%M:%S', time.localtime(rec['started']))}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes of this user (other than this one) whose environment has ``name=value``."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(name) == value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:  # gone, or another user's
            continue
    return found


def stop_processes(pids: list[int], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``grace`` seconds (a zombie has exited)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    # polled, not psutil.wait_procs: that reaps a child, and a caller that started it would lose its status
    deadline = time.monotonic() + grace
    while procs and time.monotonic() < deadline:
        time.sleep(0.1)
        procs = [p for p in procs if _running(p)]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # a zombie has exited
    except psutil.Error:
        return False


def stop_leftovers(env_name: str, run_id: str) -> list[int]:
    """Stop the processes a killed runner of ``run_id`` left behind; returns their pids."""
    pids = processes_with_env(env_name, run_id)
    if pids:
        log.warning(
            "stopping %d process(es) left over from an earlier runner of run %s: %s", len(pids), run_id, pids
        )
        stop_processes(pids)
    return pids


def die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGTERM when ``parent_pid`` (the ``dfka`` command that started us) dies, so a killed
    ``dfka pipeline run`` does not leave its runner going. No-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
