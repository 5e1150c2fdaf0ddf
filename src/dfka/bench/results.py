"""Result files of one benchmark: ``<name>.json`` (the source of truth) and ``<name>.csv`` (derived).

Runs are keyed by ``(method, seed)``: a partial run adds its rows, a re-run replaces them, and every
write is atomic. :func:`record_run` re-reads the file under a lock before it adds a row, so two
invocations on the same benchmark (say, the baselines and dfka on different cores) keep each other's
rows. When the *comparison key* changes (dataset, task, Y_cst, student, teacher recipes or weights,
evaluation split), the old results no longer describe the same experiment: they are moved aside to
``<name>.stale-<timestamp>.json`` rather than mixed into the new table.

Metric names are :mod:`dfka.evaluation`'s. CSV columns: ``benchmark, method, kind, seed, status``, the
method's union metric (``acc`` or ``map``), ``ensemble.<metric>``, per teacher ``task.<teacher>.<metric>``
(the method on that teacher's labels) and ``teacher.<teacher>.<metric>`` (the teacher itself), ``agreement`` with the
ensemble, params and FLOPs against the teachers combined, ``seconds.total`` and per stage
``seconds.<stage>``, ``steps.<stage>``, ``samples_per_second.<stage>``, then the budget and the machine.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dfka.bench.config import KIND, METHODS
from dfka.evaluation import task_key, teacher_key

log = logging.getLogger(__name__)
FORMAT = "dfka.bench/v2"
#: v1 files named the union metric ``union_<m>``, sub-tasks ``<m>.<teacher>``, teachers ``teacher_<m>.<teacher>``
V1 = "dfka.bench/v1"
LEADING = ("benchmark", "method", "kind", "seed", "status")


def json_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def csv_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.csv"


def comparison_key(header: dict[str, Any]) -> str:
    """What makes two result sets comparable: same data, label set, student and teachers. Teachers are
    compared by their weights, not only their recipe: the same recipe retrained on another machine or
    thread count gives other weights (and another ensemble), so its runs are another experiment."""
    key = {
        "dataset": header["config"]["dataset"],
        "task": header["task"],
        "labels": header["label_set"],
        "student": header["config"]["student"],
        "teachers": {
            n: [t.get("recipe_sha256"), t.get("weights_sha256")] for n, t in header["teachers"].items()
        },
    }
    split = header["config"].get("eval_split", "test")
    if split != "test":  # dev-split scores never mix with test-split ones (test keys stay as they were)
        key["eval_split"] = split
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_results(path: str | Path) -> dict[str, Any] | None:
    p = Path(path)
    if not p.is_file():
        return None
    data = json.loads(p.read_text())
    if data.get("format") == V1:
        data = upgrade_v1(data)
    if data.get("format") != FORMAT:
        log.warning("%s is not a %s result file; ignored", p, FORMAT)
        return None
    return data


def _v2_key(key: str, metric: str) -> str:
    if key == f"union_{metric}":
        return metric
    if key.startswith(f"teacher_{metric}."):
        return teacher_key(key.split(".", 1)[1], metric)
    if key.startswith(f"{metric}."):
        return task_key(key.split(".", 1)[1], metric)
    return key


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A v1 result file in the v2 metric names (nothing else changed): old results stay readable, and
    are saved as v2 the next time the file is written."""
    m = data.get("metric", "acc")

    def rename(metrics: dict[str, Any]) -> dict[str, Any]:
        return {_v2_key(k, m): v for k, v in metrics.items()}

    ref = data.get("reference", {})
    for part in ("ensemble", "teachers"):
        if isinstance(ref.get(part), dict):
            ref[part] = rename(ref[part])
    for run in data.get("runs", {}).values():
        run["metrics"] = rename(run.get("metrics", {}))
    return {**data, "format": FORMAT}


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_results(out_dir: str | Path, header: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's result data with ``header`` applied (and saved); stale results are archived first."""
    with locked(out_dir, header["benchmark"]):
        data = _open(out_dir, header)
        save_results(out_dir, data)
    return data


def _open(out_dir: str | Path, header: dict[str, Any]) -> dict[str, Any]:
    path = json_path(out_dir, header["benchmark"])
    header = {**header, "format": FORMAT}
    header["comparison_key"] = comparison_key(header)
    data = load_results(path)
    if data is not None and data.get("comparison_key") != header["comparison_key"]:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for old in (path, csv_path(out_dir, header["benchmark"])):
            if old.is_file():
                old.rename(old.with_name(f"{old.stem}.stale-{stamp}{old.suffix}"))
        log.warning(
            "%s was produced with other teachers, labels, dataset or student; moved aside as %s",
            path,
            f"{path.stem}.stale-{stamp}.json",
        )
        data = None
    runs = data.get("runs", {}) if data else {}
    return {**header, "runs": runs}


def save_results(out_dir: str | Path, data: dict[str, Any]) -> Path:
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = json_path(out_dir, data["benchmark"])
    atomic_write(path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")
    write_csv(out_dir, data)
    return path


@contextmanager
def locked(out_dir: str | Path, name: str) -> Iterator[None]:
    """An exclusive lock on benchmark ``name``'s result files, across processes."""
    path = Path(out_dir) / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def record_run(out_dir: str | Path, data: dict[str, Any], run: dict[str, Any]) -> Path:
    """Add ``run`` to ``data`` and save it, on top of whatever rows the file holds now: rows that
    another invocation added since ``data`` was opened are kept, not overwritten."""
    with locked(out_dir, data["benchmark"]):
        disk = load_results(json_path(out_dir, data["benchmark"]))
        if disk is not None and disk.get("comparison_key") == data["comparison_key"]:
            data["runs"] = dict(disk.get("runs", {}))
        add_run(data, run)
        return save_results(out_dir, data)


def run_key(method: str, seed: int) -> str:
    return f"{method}/{seed}"


def add_run(data: dict[str, Any], run: dict[str, Any]) -> None:
    data["runs"][run_key(run["method"], run["seed"])] = run


def sorted_runs(data: dict[str, Any]) -> list[dict[str, Any]]:
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(data["runs"].values(), key=lambda r: (order.get(r["method"], 99), r["seed"]))


def run_row(data: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """One CSV row (flat) for a run."""
    m = data["metric"]
    ref = data.get("reference", {})
    row: dict[str, Any] = {
        "benchmark": data["benchmark"],
        "method": run["method"],
        "kind": KIND.get(run["method"], ""),
        "seed": run["seed"],
        "status": run["status"],
    }
    row.update(run.get("metrics", {}))
    row[f"ensemble.{m}"] = ref.get("ensemble", {}).get(m)
    row.update(ref.get("teachers", {}))
    tp, tf = ref.get("teachers_params"), ref.get("teachers_flops")
    row.update(
        {"params": run.get("params"), "flops": run.get("flops"), "teachers_params": tp, "teachers_flops": tf}
    )
    if run.get("params") and tp:
        row["params_ratio"] = run["params"] / tp
    if run.get("flops") and tf:
        row["flops_ratio"] = run["flops"] / tf
    stages = run.get("stages", {})
    row["seconds.total"] = (
        sum(s.get("seconds", 0.0) for s in stages.values()) if run["status"] == "ok" else None
    )
    for stage, rep in stages.items():
        row[f"seconds.{stage}"] = rep.get("seconds")
        row[f"steps.{stage}"] = rep.get("steps")
        if rep.get("samples"):
            row[f"samples_per_second.{stage}"] = rep.get("samples_per_second")
    machine = run.get("machine", {})
    row.update(
        {
            "budget_minutes": run.get("budget_minutes"),
            "threads": run.get("threads"),
            "jobs": machine.get("jobs"),
            "cpu": machine.get("cpu"),
            "torch": machine.get("torch"),
            "commit": machine.get("git"),
            "date": run.get("date"),
        }
    )
    return row


def csv_rows(data: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    rows = [run_row(data, r) for r in sorted_runs(data)]
    tail = ("budget_minutes", "threads", "jobs", "cpu", "torch", "commit", "date")
    m = data["metric"]
    head = [*LEADING, m, f"ensemble.{m}"]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k not in head and k not in tail]

    groups = (
        "task.",
        "agreement",
        "teacher.",
        "params",
        "flops",
        "teachers_",
        "seconds.total",
        "seconds.",
    )
    groups += ("steps.", "samples_per_second.")

    def rank(k: str) -> int:  # stable: within a group, columns keep their first-seen (table) order
        return next((i for i, prefix in enumerate(groups) if k.startswith(prefix)), len(groups))

    columns = head + sorted(keys, key=rank) + list(tail)
    return columns, rows


def write_csv(out_dir: str | Path, data: dict[str, Any]) -> Path:
    columns, rows = csv_rows(data)
    path = csv_path(out_dir, data["benchmark"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value
