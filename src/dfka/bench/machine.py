"""What a benchmark ran on: CPU model, cores, torch threads and version, date, code version."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from dfka import __version__


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


#: Result files a benchmark run writes itself: changed results do not make the code "dirty".
RESULTS_DIR = "benchmarks/results/"


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_version(where: Path | None = None) -> str | None:
    """The short commit of the checkout dfka runs from (or ``where``), ``-dirty`` when tracked files other
    than the benchmark results differ from it; None outside a git checkout."""
    where = where or Path(__file__).resolve().parent
    if not where.is_dir():
        return None
    head = _git(where, "rev-parse", "--short", "HEAD")
    if not head:
        return None
    status = _git(where, "status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:] for line in status.splitlines() if line[3:] and not line[3:].startswith(RESULTS_DIR)]
    return head.strip() + ("-dirty" if changed else "")


def is_clean_commit(version: str | None) -> bool:
    """Whether a recorded code version names a commit and no uncommitted change."""
    return bool(version) and not str(version).endswith("-dirty")


def machine_info(threads: int | None = None, jobs: int = 1) -> dict[str, Any]:
    """A JSON-able record of the machine and software; ``threads`` is torch's per-job thread count."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    try:
        load = round(os.getloadavg()[0], 2)  # other processes competing for the cores at the start
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 1,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "jobs": jobs,
        "load_average": load,
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "dfka": __version__,
        "git": git_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def describe(machine: dict[str, Any], load: bool = True) -> str:
    """One line: ``Intel(R) Xeon(R) Processor, 2 cores, cpu, torch 2.13.0, 1 thread(s)/job × 2 parallel
    jobs, load 0.1 at start`` (a load near the core count means the timings were shared with others)."""
    jobs = machine.get("jobs", 1)
    par = f" × {jobs} parallel jobs" if jobs and jobs > 1 else ""
    avg = machine.get("load_average")
    busy = f", load {avg:g} at start" if load and avg is not None else ""
    return (
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('device', 'cpu')}, "
        f"torch {machine.get('torch', '?')}, {machine.get('threads', '?')} thread(s)/job{par}{busy}"
    )


def describe_all(machines: list[dict[str, Any]]) -> str:
    """Several runs' machines in one line: each distinct setup once, then the range of load averages."""
    if not machines:
        return "unknown"
    text = "; ".join(dict.fromkeys(describe(m, load=False) for m in machines))
    loads = [m["load_average"] for m in machines if m.get("load_average") is not None]
    if loads:
        low, high = min(loads), max(loads)
        text += f"; load {low:g} at start" if low == high else f"; load {low:g}–{high:g} at the runs' start"
    return text
