"""Stage 0: fetch and verify the teacher bundles, resolve Y_cst, validate the config, write the teacher set."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from dfka import storage
from dfka.amalgamation.config import AmalgamationConfig
from dfka.amalgamation.run import teacher_set_from_bundles
from dfka.bundles import MANIFEST_NAME, WEIGHTS_NAME, load_bundle
from dfka.data import data_free
from dfka.data.labels import check_dataset
from dfka.errors import CompatibilityError, ConfigError
from dfka.pipeline_config import config_hash, resolve_method_config, resolve_target_labels
from dfka.stages import report as reports
from dfka.stages._common import TEACHER_SET_FILE, TEACHER_SET_FORMAT, ensure_dir, finish
from dfka.stages.context import RunContext

STAGE = "ingest-teachers"


def ingest_teachers(
    teachers: Sequence[str],
    out: str,
    *,
    target_labels: str | Sequence[str] | None = None,
    amalgamation: Mapping[str, Any] | AmalgamationConfig | None = None,
    seed: int | None = None,
    samples: int | None = None,
    evaluation_dataset: str | None = None,
    context: RunContext | None = None,
) -> dict[str, Any]:
    """Verify the bundles (``s3://`` or folders), check that their block structures fit together, resolve
    the customised label set by name and write one teacher-set artifact to ``out``:

    ``teacher_set.json`` (the whole validated config, its hash, the report) and ``teachers/<name>/`` (a
    verified copy of each bundle that owns a target label), plus ``report.md``. ``seed`` and ``samples``
    override the ``amalgamation`` mapping; ``evaluation_dataset`` defaults to the teachers' training
    dataset when they all name the same one.
    """
    started = time.perf_counter()
    ensure_dir(out)
    with data_free("ingest teachers"):
        uris = [str(u) for u in teachers]
        if len(uris) < 2:
            raise CompatibilityError(
                f"amalgamation needs at least 2 teachers, got {len(uris)}", "pass two or more bundle URIs"
            )
        bundles = [load_bundle(uri) for uri in uris]
        union_labels = list(dict.fromkeys(label for b in bundles for label in b.labels))
        y_cst = resolve_target_labels(target_labels, union_labels)
        cfg = resolve_method_config(amalgamation, target_labels=y_cst, seed=seed, samples=samples)
        teacher_set = teacher_set_from_bundles(bundles, cfg.target_labels)
        cfg.target_labels = list(teacher_set.target_labels)  # explicit from here on, even for "the union"
        dataset = _evaluation_dataset(evaluation_dataset, bundles)
        kept = [b for b in bundles if b.name in teacher_set.names]
        source = {b.name: uri for b, uri in zip(bundles, uris)}
        config = {
            "experiment": context.experiment if context else None,
            "teachers": [source[b.name] for b in kept],
            "target_labels": list(cfg.target_labels),
            "evaluation": {"dataset": dataset},
            "amalgamation": cfg.model_dump(mode="json"),
        }
        digest = config_hash(
            {**config, "experiment": None, "teachers": [b.manifest.weights.sha256 for b in kept]}
        )
        report = teacher_set.report()
        report["dropped"] = [b.name for b in bundles if b.name not in teacher_set.names]
        for b in kept:
            report["teachers"][b.name]["source"] = source[b.name]
            report["teachers"][b.name]["metrics"] = dict(b.manifest.metrics)
        doc = {
            "format": TEACHER_SET_FORMAT,
            "config": config,
            "config_hash": digest,
            "teachers": [
                {"name": b.name, "source": source[b.name], "bundle": f"teachers/{b.name}"} for b in kept
            ],
            "report": report,
        }
        for b in kept:
            for name in (MANIFEST_NAME, WEIGHTS_NAME):
                storage.put_bytes(
                    storage.get_bytes(storage.join(source[b.name], name)),
                    storage.join(out, "teachers", b.name, name),
                )
        markdown = reports.teacher_report_markdown(report, digest)
        storage.put_bytes(markdown.encode(), storage.join(out, "report.md"))
        storage.put_bytes(json.dumps(doc, indent=2).encode(), storage.join(out, TEACHER_SET_FILE))

    metrics = {
        "teachers": float(len(kept)),
        "target_labels": float(len(cfg.target_labels)),
        "shared_labels": float(len(report["shared_labels"])),
        "teachers.params": float(report["params_total"]),
        "teachers.flops": float(report["flops_total"]),
    }
    if context is not None and (parent := context.parent(digest)) is not None:
        parent.log_params(config)
        parent.set_tags(context.tags(digest))
    with (context or RunContext(track=False, publish=False)).stage_run(STAGE, config, digest) as tracker:
        tracker.log_metrics(metrics)
        tracker.log_text(markdown, "report.md")
        tracker.log_dict(report, "teacher_set_report.json")
        result = {
            "outputs": {"teacher_set": out},
            "metrics": metrics,
            "target_labels": list(cfg.target_labels),
            "evaluation_dataset": dataset,
            "config_hash": digest,
            "report_markdown": markdown,
        }
        return finish(STAGE, out, context, tracker, result, started)


def _evaluation_dataset(explicit: str | None, bundles: Sequence[Any]) -> str | None:
    if explicit:
        return check_dataset(explicit)
    named = {b.manifest.training.get("dataset") for b in bundles}
    if len(named) == 1 and (only := named.pop()):
        try:
            return check_dataset(str(only))
        except ConfigError:
            return None
    return None
