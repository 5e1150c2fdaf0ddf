"""Shared plumbing of the stage functions: the teacher-set artifact, sample locations, finishing a stage."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfka import storage
from dfka.amalgamation.config import AmalgamationConfig
from dfka.amalgamation.run import StageReport, teacher_set_from_bundles
from dfka.amalgamation.samples import read_manifest
from dfka.amalgamation.teacher_set import TeacherSet
from dfka.amalgamation.union import UnionRule
from dfka.bundles import TeacherBundle, load_bundle
from dfka.engine.checkpoint import Checkpoints
from dfka.errors import BundleError
from dfka.runtime import pick_device, set_threads
from dfka.stages import report as reports
from dfka.stages.context import TAG_OUTPUTS, RunContext
from dfka.tracking import TrackingRun

log = logging.getLogger(__name__)

TEACHER_SET_FILE = "teacher_set.json"
TEACHER_SET_FORMAT = "dfka.teacher_set/v1"
LOCATION_FILE = "location.json"
RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"
#: Sub-folders a stage keeps in its KFP artifact but does not copy to runs/<run-id>/ (large, intermediate).
UNPUBLISHED = ("trajectory/", f"{CHECKPOINTS}/")
#: Result keys left out of result.json (large, and written as files of their own).
NOT_RECORDED = ("html",)


@dataclass
class TeacherSetArtifact:
    """What every stage after ingestion starts from: the validated config and the verified teachers."""

    uri: str
    doc: dict[str, Any]
    cfg: AmalgamationConfig
    bundles: list[TeacherBundle]
    teachers: TeacherSet
    union: UnionRule
    device: torch.device

    @property
    def config_hash(self) -> str:
        return str(self.doc["config_hash"])

    @property
    def params(self) -> dict[str, Any]:
        """The whole validated config: what every MLflow run of the pipeline logs as params."""
        return dict(self.doc["config"])


def load_teacher_set(uri: str, device: str | None = None) -> TeacherSetArtifact:
    """Read an ingestion output: re-verify each bundle, rebuild the teacher set and union on the device.

    ``device`` overrides the config's: the CPU-only stages pass ``auto`` so that a config that says
    ``cuda`` (for the GPU stages) still runs them on a CPU node.
    """
    key = storage.join(uri, TEACHER_SET_FILE)
    if not storage.exists(key):
        raise BundleError(f"{key} does not exist", "point at the output of the ingest-teachers stage")
    doc = json.loads(storage.get_bytes(key))
    if doc.get("format") != TEACHER_SET_FORMAT:
        raise BundleError(f"{key} has format {doc.get('format')!r}, expected {TEACHER_SET_FORMAT!r}")
    cfg = AmalgamationConfig.model_validate(doc["config"]["amalgamation"])
    set_threads(cfg.threads)
    device = pick_device(device or cfg.device)
    bundles = [load_bundle(storage.join(uri, t["bundle"])) for t in doc["teachers"]]
    teachers = teacher_set_from_bundles(bundles, cfg.target_labels).to(device)
    union = UnionRule(teachers, cfg.union.rule).to(device)
    return TeacherSetArtifact(uri, doc, cfg, bundles, teachers, union, device)


def write_location(out: str, samples_uri: str, manifest: dict[str, Any]) -> None:
    doc = {"uri": samples_uri, "count": manifest["count"], "shards": len(manifest["shards"])}
    storage.put_bytes(json.dumps(doc, indent=2).encode(), storage.join(out, LOCATION_FILE))


def samples_location(uri: str) -> str:
    """Where an export stage output keeps its shards (it may point into the object store)."""
    key = storage.join(uri, LOCATION_FILE)
    if storage.exists(key):
        return str(json.loads(storage.get_bytes(key))["uri"])
    return uri


def ensure_dir(out: str) -> str:
    if not storage.is_s3(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    return out


def report_metrics(prefix: str, report: StageReport) -> dict[str, float]:
    """Throughput and wall-clock of the stage's main loop, as metrics (same names in every run)."""
    return {
        f"{prefix}.seconds": float(report.seconds),
        f"{prefix}.steps": float(report.steps),
        f"{prefix}.samples": float(report.samples),
        f"{prefix}.samples_per_second": float(report.samples_per_second),
    }


def finish(
    stage: str,
    out: str,
    ctx: RunContext | None,
    tracker: TrackingRun,
    result: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Write ``result.json``, publish the output folder to runs/<run-id>/<stage>/, record the wall time."""
    result["stage"] = stage
    result["seconds"] = time.perf_counter() - started
    result["process_seconds"] = process_age()
    result["run_id"] = ctx.run_id if ctx else None
    result["mlflow_run_id"] = tracker.run_id
    offline = getattr(tracker, "offline_path", None)
    result["tracking_offline"] = str(offline) if offline else None
    published = ctx.publish_uri(stage) if ctx else None
    result["published"] = published
    record = {k: v for k, v in result.items() if k not in NOT_RECORDED}
    storage.put_bytes(json.dumps(record, indent=2, default=str).encode(), storage.join(out, RESULT_FILE))
    if published:
        publish_dir(out, published)
        tracker.set_tags({TAG_OUTPUTS: published})
    tracker.log_metrics({"stage.wall_seconds": result["seconds"]})
    if ctx is not None and (parent := ctx.parent()) is not None:
        steps = (result.get("report") or {}).get("steps")
        per_stage = {f"stage.{stage}.seconds": result["seconds"]}
        if isinstance(steps, int | float):  # wall-clock budgets: steps differ between equal configs
            per_stage[f"stage.{stage}.steps"] = steps
        parent.log_metrics(per_stage)
    log.info("%s finished in %.1f s%s", stage, result["seconds"], f" -> {published}" if published else "")
    if offline:
        log.warning(
            "%s: MLflow was unreachable; this stage's params and metrics are kept in %s. "
            "Upload them with `dfka tracking sync` once the server is back.",
            stage,
            offline,
        )
    return result


def stage_checkpoints(
    stage: str,
    out: str,
    ctx: RunContext | None,
    ts: TeacherSetArtifact,
    inputs: dict[str, Any] | None = None,
) -> Checkpoints:
    """Where a training stage checkpoints: ``s3://<bucket>/runs/<run-id>/<stage>/checkpoints`` when the
    run publishes to an object store (a KFP retry or a rerun with the same run id finds it there), else
    ``<out>/checkpoints``. The interval is ``DFKA_CHECKPOINT_EVERY`` (the pipeline sets it)."""
    published = ctx.publish_uri(stage) if ctx else None
    uri = storage.join(published or out, CHECKPOINTS)
    return Checkpoints(uri, stage=stage, config_hash=ts.config_hash, inputs=inputs)


def process_age() -> float | None:
    """Seconds since this process started (interpreter start and imports included)."""
    import psutil

    try:
        return time.time() - psutil.Process().create_time()
    except psutil.Error:
        return None


def publish_dir(out: str, dest: str) -> None:
    """Copy a local stage output to the object store (minus the intermediate sub-folders)."""
    if storage.is_s3(out) or out == dest:
        return
    for rel in storage.listdir(out):
        if not rel.startswith(UNPUBLISHED):
            storage.put_file(Path(out) / rel, storage.join(dest, rel))


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="dfka-stage-")


# ---------------------------------------------------------------- what several stages show

GRID_FILE = "samples_grid.png"


def union_scores(ts: TeacherSetArtifact, logits: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return ts.union({k: v.float().to(ts.device) for k, v in logits.items()}).cpu()


def sample_grid_file(
    ts: TeacherSetArtifact, images: torch.Tensor, logits: dict[str, torch.Tensor], out: str
) -> Path:
    """Write the sample grid into ``out`` (local) or a temp file that is then uploaded."""
    scores = union_scores(ts, logits)
    if not storage.is_s3(out):
        return reports.sample_grid(images, scores, ts.teachers.target_labels, Path(out) / GRID_FILE)
    with scratch() as tmp:
        path = reports.sample_grid(images, scores, ts.teachers.target_labels, Path(tmp) / GRID_FILE)
        storage.put_file(path, storage.join(out, GRID_FILE))
    return Path(storage.join(out, GRID_FILE))


def restore_routing(ts: TeacherSetArtifact, samples_uri: str) -> dict[str, Any]:
    """Load the union's routing calibration the export stage fitted (if any); the manifest's extras."""
    manifest = read_manifest(samples_uri)
    if manifest.extra.get("routing"):
        ts.union.load_calibration(manifest.extra["routing"])
    return dict(manifest.extra)


def log_grid(tracker: TrackingRun, grid: Path) -> None:
    if grid.is_file():
        tracker.log_artifact(grid, "samples")
