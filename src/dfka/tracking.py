"""A thin MLflow layer that never stops work.

Training must not die, or hang for minutes, because the tracking server is down. So the client's HTTP
retries are cut to seconds, the server is probed before a run starts, and any failure switches the run to
*offline mode*: every record goes to ``$DFKA_HOME/offline-runs/<experiment>/<local-id>.jsonl`` (artifacts
next to it) and ``dfka tracking sync`` replays it later. It uses ``MlflowClient`` with explicit run ids, not
the fluent API's global active run, so parallel runs and nested runs in one process cannot mix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dfka.errors import StackError
from dfka.settings import SECRET_ENV_KEYS, dfka_home, network_timeout, redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

#: Keep a dead server cheap; users can still override any of these in the environment.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
MAX_KEY, MAX_PARAM, MAX_TAG = 250, 6000, 8000
BATCH_PARAMS, BATCH_METRICS = 100, 1000
SECRET_KEY_WORDS = ("secret", "password", "token")
REDACTED = "***"
#: MLflow rejected the record itself (bad value, param changed): retrying or going offline cannot help.
REJECTED_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"}
_experiment_ids: dict[tuple[str, str], str] = {}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _offline_root(home: Path | None = None) -> Path:
    return (home or dfka_home()) / "offline-runs"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "default"


def probe(uri: str, timeout: float = 2.0) -> str | None:
    """``None`` if ``<uri>/health`` answers 200 (or the URI is not http), else the reason."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def apply_http_defaults() -> None:
    """MLflow's HTTP retry and timeout settings, where the user has not set them: two tries of half
    ``DFKA_NETWORK_TIMEOUT`` each, so an unanswering server fails in about that time."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # MLflow prints "View run … at: <url>" to stdout for every run it ends; dfka prints its own links once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", f"{max(1, round(network_timeout() / 2))}")


def mlflow_client(uri: str) -> MlflowClient:
    """An MLflow client for ``uri`` with dfka's HTTP retry and timeout defaults."""
    apply_http_defaults()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing (safe against a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    if (uri, name) not in _experiment_ids:
        _experiment_ids[uri, name] = experiment_id(client, name)
    return _experiment_ids[uri, name]


def _rejected(err: Exception) -> bool:
    return getattr(err, "error_code", None) in REJECTED_CODES


# ---------------------------------------------------------------- params


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}, "c": [{"d": 3}]}`` → ``{"a.b": [1, 2], "c.0.d": 3}``: mappings (pydantic
    models and dataclasses too) become dotted keys; a list of plain values stays one value, so that ten
    target labels are one param that a run comparison shows in one row; a list of mappings is indexed."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping) and obj:
        items = obj.items()
    elif isinstance(obj, list | tuple) and any(_nested(v) for v in obj):
        items = enumerate(obj)
    else:
        return {prefix.rstrip("."): obj}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def _nested(value: Any) -> bool:
    return isinstance(value, Mapping | list | tuple) or hasattr(value, "model_dump")


def param_text(value: Any) -> str:
    """How a flattened value reads as a param: lists as JSON (``["digit_0", "digit_1"]``); ``None`` and
    empty mappings as the empty string (unset is no value, not the word None; the key stays, so every
    run of a kind has the same param keys and a comparison lines them up)."""
    if value is None or (isinstance(value, Mapping) and not value):
        return ""
    if isinstance(value, list | tuple):
        return json.dumps(list(value), default=str)
    return str(value)


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Flatten, stringify (unset values as ""), redact secrets and truncate to MLflow's limits."""
    secrets = {v for k in SECRET_ENV_KEYS if (v := os.environ.get(k))}
    cleaned = {}
    for key, value in flatten(dict(params)).items():
        text = param_text(value)
        if any(word in key.lower() for word in SECRET_KEY_WORDS) or text in secrets:
            text = REDACTED
        cleaned[key[:MAX_KEY]] = redact(text)[:MAX_PARAM]
    return cleaned


# ---------------------------------------------------------------- the tracker


class TrackingRun(Protocol):
    """What stages, the benchmarks and training loops need of a run: :class:`Tracker` (online or
    offline) and ``dfka.stages.context.NullTracker`` (tracking off) both are one. Also a training
    callback: ``train(..., on_metrics=run)``."""

    @property
    def run_id(self) -> str | None: ...

    @property
    def offline(self) -> bool: ...

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None: ...


class Tracker:
    """One MLflow run (online, or recorded offline). Create with ``Tracker.start`` or ``parent.child``."""

    def __init__(
        self,
        experiment: str,
        run_name: str,
        uri: str | None,
        parent: Tracker | None,
        tags: dict[str, str],
    ) -> None:
        self.experiment, self.run_name, self._uri, self._parent = experiment, run_name, uri, parent
        self._tags = tags
        self.local_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._client: MlflowClient | None = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._offline_path: Path | None = None
        self._start_ms = _now_ms()
        self._ended = False
        self._stepped: set[str] = set()  # keys logged with a step: their summary is their last point

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str,
        *,
        parent: Tracker | None = None,
        tags: dict[str, Any] | None = None,
        tracking_uri: str | None = None,
    ) -> Tracker:
        """Start a run; never raises for an unreachable server (the run is recorded offline instead)."""
        uri = parent._uri if parent else (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None)
        all_tags = {k: str(v)[:MAX_TAG] for k, v in (tags or {}).items()}
        tracker = cls(experiment, run_name, uri, parent, all_tags)
        all_tags["dfka.local_id"] = tracker.local_id
        if parent is not None and parent.offline:
            tracker._go_offline("its parent run is offline", quiet=True)
        elif uri is None:
            tracker._go_offline("MLFLOW_TRACKING_URI is not set (start a server with `dfka stack up`)")
        elif parent is None and (reason := probe(uri)) is not None:
            tracker._go_offline(f"the MLflow server at {uri} is unreachable ({reason})")
        else:
            try:
                tracker._client = parent._client if parent and parent._client else mlflow_client(uri)
                tracker._experiment_id = _experiment_id(tracker._client, uri, experiment)
                if parent is not None:
                    all_tags["mlflow.parentRunId"] = parent.run_id or ""
                run = tracker._client.create_run(tracker._experiment_id, tags=all_tags, run_name=run_name)
                tracker._run_id = run.info.run_id
            except Exception as err:
                tracker._go_offline(f"MLflow at {uri} failed: {redact(str(err))[:300]}")
        return tracker

    def child(self, run_name: str, tags: dict[str, Any] | None = None) -> Tracker:
        """A nested run (``mlflow.parentRunId``); offline if this run is offline."""
        return Tracker.start(self.experiment, run_name, parent=self, tags=tags)

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        self._ended = True
        end_ms = _now_ms()
        self._emit(
            {"kind": "end", "status": status, "end_time": end_ms},
            lambda c, r: c.set_terminated(r, status=status, end_time=end_ms),
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")

    # ------------------------------------------------------------ properties

    @property
    def run_id(self) -> str | None:
        """The server's run id (``None`` for a run that has only been recorded offline)."""
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    @property
    def offline(self) -> bool:
        return self._offline_path is not None

    @property
    def offline_path(self) -> Path | None:
        return self._offline_path

    # ------------------------------------------------------------ logging

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        cleaned = clean_params(params)
        items = list(cleaned.items())
        for i in range(0, len(items), BATCH_PARAMS):
            chunk = dict(items[i : i + BATCH_PARAMS])
            self._emit(
                {"kind": "params", "params": chunk},
                lambda c, r, chunk=chunk: c.log_batch(r, params=[Param(k, v) for k, v in chunk.items()]),
            )

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log ``metrics`` at ``step``; without a step they are the run's summary values.

        A summary value under a key that already has a per-step history is not logged: that history's
        last point is the summary, and MLflow would store a step-less value as step 0, drawing a false
        first point (or a diagonal back to the start) on the key's chart.
        """
        from mlflow.entities import Metric

        values: dict[str, float] = {}
        for key, value in metrics.items():
            key = key[:MAX_KEY]
            if step is None and key in self._stepped:
                continue
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                log.warning("metric %r is not a number (%r); skipped", key, type(value).__name__)
        if step is not None:
            self._stepped.update(values)
        stamp, items = _now_ms(), list(values.items())
        for i in range(0, len(items), BATCH_METRICS):
            chunk = dict(items[i : i + BATCH_METRICS])
            entities = [Metric(k, v, stamp, step or 0) for k, v in chunk.items()]
            self._emit(
                {"kind": "metrics", "metrics": chunk, "step": step, "timestamp": stamp},
                lambda c, r, entities=entities: c.log_batch(r, metrics=entities),
            )

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        """Use the tracker as a training callback: ``train(..., on_metrics=tracker)``."""
        self.log_metrics(metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        clean = {k[:MAX_KEY]: redact(str(v))[:MAX_TAG] for k, v in tags.items()}
        self._emit(
            {"kind": "tags", "tags": clean},
            lambda c, r: c.log_batch(r, tags=[RunTag(k, v) for k, v in clean.items()]),
        )

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under ``artifact_path``."""
        path = Path(local_path)
        if not path.exists():
            log.warning("artifact %s does not exist; not logged", path)
            return
        upload = "log_artifacts" if path.is_dir() else "log_artifact"
        if self._try_online("artifact", lambda c, r: getattr(c, upload)(r, str(path), artifact_path)):
            return
        dest = self._artifact_dir() / (artifact_path or "") / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(path, dest)
        self._append_artifact(dest, artifact_path, is_dir=path.is_dir())

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._try_online("artifact", lambda c, r: c.log_text(r, text, artifact_file)):
            return
        dest = self._artifact_dir() / artifact_file
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        parent = str(Path(artifact_file).parent)
        self._append_artifact(dest, None if parent == "." else parent, is_dir=False)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """JSON, or YAML for ``.yaml``/``.yml`` files (same format online and offline)."""
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(obj, sort_keys=False)
        else:
            text = json.dumps(obj, indent=2, default=str)
        self.log_text(text, artifact_file)

    # ------------------------------------------------------------ online/offline plumbing

    def _try_online(self, kind: str, call: Callable[[MlflowClient, str], object]) -> bool:
        """True if the server took the record (or rejected it for good); False means: record it offline."""
        if self._offline_path is not None or self._client is None or self._run_id is None:
            return False
        try:
            call(self._client, self._run_id)
        except Exception as err:
            if _rejected(err):
                log.warning("MLflow rejected %s for run %r: %s", kind, self.run_name, redact(str(err))[:300])
                return True
            self._go_offline(f"MLflow at {self._uri} failed: {redact(str(err))[:300]}")
            return False
        return True

    def _emit(self, record: dict[str, Any], call: Callable[[MlflowClient, str], object]) -> None:
        if not self._try_online(record["kind"], call):
            self._append(record)

    def _artifact_dir(self) -> Path:
        assert self._offline_path is not None
        return self._offline_path.with_suffix("")

    def _append_artifact(self, dest: Path, artifact_path: str | None, is_dir: bool) -> None:
        assert self._offline_path is not None
        rel = dest.relative_to(self._offline_path.parent).as_posix()
        self._append({"kind": "artifact", "file": rel, "artifact_path": artifact_path, "dir": is_dir})

    def _append(self, record: dict[str, Any]) -> None:
        assert self._offline_path is not None
        with self._offline_path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    def _go_offline(self, reason: str, quiet: bool = False) -> None:
        """Switch to offline mode (once): open the jsonl with a ``run`` record, warn naming the file."""
        if self._offline_path is not None:
            return
        path = _offline_root() / _safe(self.experiment) / f"{self.local_id}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._offline_path = path
        parent = self._parent
        self._append(
            {
                "kind": "run",
                "local_id": self.local_id,
                "experiment": self.experiment,
                "run_name": self.run_name,
                "run_id": self._run_id,
                "parent_local_id": parent.local_id if parent else None,
                "parent_run_id": parent.run_id if parent else None,
                "tags": self._tags,
                "start_time": self._start_ms,
            }
        )
        (log.info if quiet else log.warning)(
            "tracking run %r offline: %s. Recording to %s; replay it with `dfka tracking sync`.",
            self.run_name,
            reason,
            path,
        )


# ---------------------------------------------------------------- offline runs and sync


@dataclass
class OfflineRun:
    path: Path
    records: list[dict[str, Any]]

    @property
    def header(self) -> dict[str, Any]:
        return self.records[0]

    @property
    def finished(self) -> bool:
        return any(r["kind"] == "end" for r in self.records)

    @property
    def synced_run_id(self) -> str | None:
        return next((r["run_id"] for r in self.records if r["kind"] == "synced"), None)

    @classmethod
    def read(cls, path: Path) -> OfflineRun:
        """The records of ``path``. A cut-off last line (the process died mid-write) is dropped with a
        warning; damage anywhere else is refused with the line number."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise StackError(
                f"cannot read offline run record {path}: {err}", "move the file out of offline-runs/"
            ) from None
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        records = []
        for i, (n, line) in enumerate(numbered):
            try:
                record = json.loads(line)
            except ValueError:
                if i == len(numbered) - 1 and records:
                    log.warning(
                        "%s: line %d was cut off mid-write (the run was killed?); ignoring it", path, n
                    )
                    break
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
                raise StackError(
                    f"{path} line {n} is damaged (not a JSON record with a kind)",
                    "move the file out of offline-runs/ (its runs cannot be synced)",
                )
            records.append(record)
        if not records or records[0].get("kind") != "run":
            raise StackError(f"{path} is not an offline run record", "move the file out of offline-runs/")
        return cls(path, records)


@dataclass
class SyncResult:
    path: Path
    experiment: str
    run_name: str
    status: str  # synced | skipped | failed
    run_id: str | None = None
    detail: str = ""


def pending_offline(home: Path | None = None) -> list[OfflineRun]:
    """Offline runs not synced yet, oldest first."""
    root = _offline_root(home)
    return [OfflineRun.read(p) for p in sorted(root.glob("*/*.jsonl"), key=lambda p: p.name)]


def _synced_ids(root: Path) -> Iterator[tuple[str, str]]:
    for path in root.glob("*/synced/*.jsonl"):
        run = OfflineRun.read(path)
        if run.synced_run_id:
            yield run.header["local_id"], run.synced_run_id


def sync_offline(
    tracking_uri: str | None = None, *, home: Path | None = None, include_unfinished: bool = False
) -> list[SyncResult]:
    """Replay offline runs to the server (parents before children); move each synced file to ``synced/``.

    Unfinished runs (no ``end`` record: still running, or crashed) are skipped unless ``include_unfinished``,
    which syncs them with status KILLED.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise StackError(
            "no MLflow tracking server to sync to", "run `dfka stack up` or set MLFLOW_TRACKING_URI"
        )
    if (reason := probe(uri)) is not None:
        raise StackError(
            f"the MLflow server at {uri} is unreachable ({reason})", "is it up? `dfka stack status`"
        )
    client = mlflow_client(uri)
    root = _offline_root(home)
    server_ids = dict(_synced_ids(root))
    todo = pending_offline(home)
    results: list[SyncResult] = []
    while todo:
        progressed, deferred = False, []
        for run in todo:
            head = run.header
            parent_local = head.get("parent_local_id")
            parent_id = head.get("parent_run_id") or (server_ids.get(parent_local) if parent_local else None)
            if parent_local and not parent_id:
                deferred.append(run)
                continue
            progressed = True
            result = SyncResult(run.path, head["experiment"], head["run_name"], "skipped")
            if not run.finished and not include_unfinished:
                result.detail = "no end record (still running or crashed); use --include-unfinished"
            else:
                try:
                    result.run_id = _replay(client, uri, run, parent_id)
                    result.status = "synced"
                    server_ids[head["local_id"]] = result.run_id
                    _archive(run, result.run_id)
                except Exception as err:
                    result.status, result.detail = "failed", redact(f"{type(err).__name__}: {err}")[:500]
            results.append(result)
        if not progressed:
            for run in deferred:
                head = run.header
                detail = f"parent run {head['parent_local_id']} is not synced"
                results.append(
                    SyncResult(run.path, head["experiment"], head["run_name"], "skipped", detail=detail)
                )
            break
        todo = deferred
    return results


def _replay(client: MlflowClient, uri: str, run: OfflineRun, parent_id: str | None) -> str:
    from mlflow.entities import Metric, Param, RunTag

    head = run.header
    run_id, created = head.get("run_id"), False
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if not run_id:
        tags = dict(head.get("tags") or {})
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        exp_id = _experiment_id(client, uri, head["experiment"])
        run_id = client.create_run(
            exp_id, start_time=head.get("start_time"), tags=tags, run_name=head["run_name"]
        )
        run_id, created = run_id.info.run_id, True
    try:
        metrics: list[Metric] = []
        status = "KILLED"
        for rec in run.records[1:]:
            kind = rec["kind"]
            if kind == "metrics":
                step = rec.get("step") or 0
                metrics += [Metric(k, _num(v), rec["timestamp"], step) for k, v in rec["metrics"].items()]
            elif kind == "params":
                client.log_batch(run_id, params=[Param(k, v) for k, v in rec["params"].items()])
            elif kind == "tags":
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
            elif kind == "artifact":
                local = run.path.parent / rec["file"]
                if rec.get("dir"):
                    client.log_artifacts(run_id, str(local), rec.get("artifact_path"))
                else:
                    client.log_artifact(run_id, str(local), rec.get("artifact_path"))
            elif kind == "end":
                status = rec["status"]
        for i in range(0, len(metrics), BATCH_METRICS):
            client.log_batch(run_id, metrics=metrics[i : i + BATCH_METRICS])
        end = next((r["end_time"] for r in run.records if r["kind"] == "end"), None)
        client.set_terminated(run_id, status=status, end_time=end)
    except BaseException:
        if created:  # do not leave a half-replayed duplicate behind; the next sync starts over
            client.delete_run(run_id)
        raise
    return run_id


def _num(value: Any) -> float:
    return float(value) if value is not None else math.nan


def _archive(run: OfflineRun, run_id: str) -> None:
    """Mark the file synced (children synced later find their parent's id) and move it to ``synced/``."""
    with run.path.open("a") as fh:
        fh.write(json.dumps({"kind": "synced", "run_id": run_id, "time": _now_ms()}) + "\n")
    dest = run.path.parent / "synced"
    dest.mkdir(exist_ok=True)
    artifacts = run.path.with_suffix("")
    if artifacts.is_dir():
        shutil.move(str(artifacts), dest / artifacts.name)
    run.path.rename(dest / run.path.name)
