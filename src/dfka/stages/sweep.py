"""The two steps a sweep adds around its variants' six stages (``pipelines/dfka_sweep.py``).

``open_sweep`` runs first: it checks the ``variants`` parameter (on a cluster it comes from whoever
created the run) and makes the sweep's MLflow parent run, so that every variant's parent run finds it
and nests under it. ``gather_sweep`` runs last: it reads each variant's evaluation and the wall-clock of
its stages and writes one comparison (Markdown, CSV, a plot of score against training wall-clock, an
HTML page with both), logs it to the sweep's parent run and ends that run.

A variant is one dict of stage inputs (:meth:`dfka.pipeline_config.ExperimentConfig.sweep_variants`):
``variant`` (its name), ``teachers``, ``target_labels``, ``amalgamation``, ``seed``, ``samples``,
``evaluation_dataset``, and for grouping ``config`` and ``teacher_set``.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dfka import storage
from dfka.errors import ConfigError
from dfka.pipeline_config import GPU_STAGES, STAGES, VARIANT_NAME, VARIANT_NAME_RULE
from dfka.settings import redact
from dfka.stages import report as reports
from dfka.stages._common import RESULT_FILE, ensure_dir, publish_dir, scratch
from dfka.stages.context import (
    ParentRun,
    RunContext,
    _client,
    _find_or_create_parent,
    find_parent,
)

log = logging.getLogger(__name__)

OPEN_STAGE = "open-sweep"
GATHER_STAGE = "gather-sweep"
TABLE_MD, TABLE_CSV, PLOT_PNG, REPORT_HTML, SWEEP_JSON = (
    "sweep.md",
    "sweep.csv",
    "sweep.png",
    "report.html",
    "sweep.json",
)
#: The stages whose wall-clock is the variant's training time (what a budget limits).
TRAINING_STAGES = (*GPU_STAGES, "export-synthetic-samples")
REQUIRED_KEYS = ("variant", "teachers", "amalgamation", "seed")


def check_variants(variants: Sequence[Any]) -> list[str]:
    """The variants' names, or a :class:`ConfigError` that says what is wrong with the parameter."""
    fix = "make the list with `dfka pipeline sweep --config X --print-variants`"
    if not isinstance(variants, Sequence) or isinstance(variants, str) or not variants:
        raise ConfigError("the sweep has no variants: `variants` must be a non-empty list of dicts", fix)
    names = []
    for i, v in enumerate(variants):
        if not isinstance(v, Mapping):
            raise ConfigError(f"variants[{i}] is a {type(v).__name__}, not a dict", fix)
        missing = [k for k in REQUIRED_KEYS if k not in v]
        if missing:
            raise ConfigError(f"variants[{i}] has no {', '.join(missing)}", fix)
        name = v["variant"]
        if not isinstance(name, str) or not re.fullmatch(VARIANT_NAME, name):
            raise ConfigError(f"variants[{i}] is named {name!r}: use {VARIANT_NAME_RULE}", fix)
        if name in names:
            raise ConfigError(f"two variants are named {name!r}: each needs its own run id", fix)
        names.append(name)
    return names


def open_sweep(variants: Sequence[Mapping[str, Any]], *, context: RunContext | None = None) -> dict[str, Any]:
    """Check the variants and create the sweep's MLflow parent run (tag ``dfka.kind = sweep``)."""
    names = check_variants(variants)
    ctx = context or RunContext(track=False, publish=False)
    parent = _sweep_parent(ctx, create=True, names=names)
    log.info("sweep %s: %d variants (%s)", ctx.run_id, len(names), ", ".join(names))
    return {"stage": OPEN_STAGE, "variants": names, "mlflow_run_id": parent.run_id if parent else None}


def gather_sweep(
    variants: Sequence[Mapping[str, Any]],
    results: Sequence[str],
    out: str,
    *,
    context: RunContext | None = None,
) -> dict[str, Any]:
    """One comparison of the variants' evaluations (``results``: their evaluate outputs, any order)."""
    started = time.perf_counter()
    names = check_variants(variants)
    ctx = context or RunContext(track=False, publish=False)
    ensure_dir(out)
    by_run = {}
    for uri in results:
        doc = json.loads(storage.get_bytes(storage.join(uri, RESULT_FILE)))
        by_run[str(doc.get("run_id"))] = doc
    rows = []
    for variant, name in zip(variants, names, strict=True):
        run_id = f"{ctx.run_id}-{name}"
        doc = by_run.get(run_id)
        if doc is None:
            raise ConfigError(
                f"no evaluation of variant {name!r} (run id {run_id}) among the {len(results)} gathered",
                "gather the evaluate outputs of this sweep's own variants",
            )
        rows.append(_row(variant, name, run_id, doc, _stage_seconds(ctx, run_id)))
    metric = rows[0]["metric"]
    groups = _groups(rows)
    markdown = sweep_markdown(rows, groups, ctx.run_id)
    table_csv = sweep_csv(rows)
    with scratch() as tmp:
        local = Path(out) if not storage.is_s3(out) else Path(tmp)
        local.mkdir(parents=True, exist_ok=True)
        plot = sweep_plot(rows, local / PLOT_PNG)
        page = sweep_html(markdown_rows(rows), groups, plot, ctx.run_id)
        (local / TABLE_MD).write_text(markdown)
        (local / TABLE_CSV).write_text(table_csv)
        (local / REPORT_HTML).write_text(page)
        (local / SWEEP_JSON).write_text(json.dumps({"rows": rows, "groups": groups}, indent=2))
        metrics = {f"variant.{r['variant']}.{metric}": r["score"] for r in rows}
        metrics |= {f"variant.{r['variant']}.train_seconds": r["train_seconds"] for r in rows}
        metrics |= {f"config.{g['group']}.{metric}": g["score_mean"] for g in groups}
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v == v}
        parent = _sweep_parent(ctx, create=False)
        if parent is not None:
            parent.log_metrics(metrics)
            for name in (TABLE_MD, TABLE_CSV, PLOT_PNG, REPORT_HTML, SWEEP_JSON):
                parent.log_artifact(local / name, "sweep")
        if storage.is_s3(out):
            storage.put_dir(local, out)
    result = {
        "stage": GATHER_STAGE,
        "run_id": ctx.run_id,
        "rows": rows,
        "groups": groups,
        "metrics": metrics,
        "markdown": markdown,
        "csv": table_csv,
        "html": page,
        "mlflow_run_id": parent.run_id if parent else None,
        "seconds": time.perf_counter() - started,
    }
    published = ctx.publish_uri(GATHER_STAGE)
    result["published"] = published
    storage.put_bytes(
        json.dumps({k: v for k, v in result.items() if k != "html"}, indent=2, default=str).encode(),
        storage.join(out, RESULT_FILE),
    )
    if published:
        publish_dir(out, published)
    if parent is not None:
        parent.set_tags({"dfka.results": published or out})
        parent.end("FINISHED")
    return result


# ---------------------------------------------------------------- reading the variants


def _stage_seconds(ctx: RunContext, run_id: str) -> dict[str, float]:
    """Each stage's wall-clock, from the results it published under ``runs/<variant run id>/``."""
    seconds: dict[str, float] = {}
    variant = dataclasses.replace(ctx, run_id=run_id)
    for stage in STAGES:
        published = variant.publish_uri(stage)
        if published is None:  # nothing published (no object store): the table says "–"
            return seconds
        key = storage.join(published, RESULT_FILE)
        if storage.exists(key):
            value = json.loads(storage.get_bytes(key)).get("seconds")
            if isinstance(value, int | float):
                seconds[stage] = float(value)
    return seconds


def _row(
    variant: Mapping[str, Any], name: str, run_id: str, doc: Mapping[str, Any], seconds: Mapping[str, float]
) -> dict[str, Any]:
    results = doc["results"]
    metric = "acc" if results["metric"] == "top-1 accuracy" else "map"
    union, ensemble = float(results["student"]["union"]), float(results["ensemble"]["union"])
    train = [seconds[s] for s in TRAINING_STAGES if s in seconds]
    return {
        "variant": name,
        "teacher_set": str(variant.get("teacher_set") or ""),
        "config": str(variant.get("config") or name),
        "seed": int(float(variant["seed"])),
        "run_id": run_id,
        "metric": metric,
        "score": union,
        "ensemble": ensemble,
        "ratio": union / ensemble if ensemble > 0 else math.nan,
        "tasks": {k: float(v) for k, v in results["student"]["tasks"].items()},
        "student": results["student"]["spec"],
        "params": int(results["student"]["params"]),
        "train_seconds": sum(train) if len(train) == len(TRAINING_STAGES) else math.nan,
        "pipeline_seconds": sum(seconds.values()) if len(seconds) == len(STAGES) else math.nan,
        "published": doc.get("published") or "",
    }


def _groups(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over the seeds of each (teacher set, config)."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        grouped.setdefault(_group_name(r), []).append(r)
    out = []
    for group, members in grouped.items():
        scores = [m["score"] for m in members]
        train = [m["train_seconds"] for m in members if m["train_seconds"] == m["train_seconds"]]
        out.append(
            {
                "group": group,
                "seeds": [m["seed"] for m in members],
                "score_mean": statistics.fmean(scores),
                "score_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "ratio_mean": statistics.fmean(m["ratio"] for m in members),
                "train_seconds_median": statistics.median(train) if train else math.nan,
            }
        )
    return sorted(out, key=lambda g: -g["score_mean"])


def _group_name(row: Mapping[str, Any]) -> str:
    return "-".join(p for p in (row["teacher_set"], row["config"]) if p)


# ---------------------------------------------------------------- what people look at


def _sec(x: float) -> str:
    return "–" if x != x else f"{x:.0f} s"


HEADER = ("variant", "seed", "score", "× ensemble", "ensemble", "training wall-clock", "pipeline wall-clock")


def markdown_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            r["variant"],
            str(r["seed"]),
            reports.pct(r["score"]),
            f"{r['ratio']:.3f}",
            reports.pct(r["ensemble"]),
            _sec(r["train_seconds"]),
            _sec(r["pipeline_seconds"]),
        ]
        for r in rows
    ]


def group_rows(groups: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [
            g["group"],
            ", ".join(str(s) for s in g["seeds"]),
            f"{100 * g['score_mean']:.2f} ± {100 * g['score_std']:.2f}",
            f"{g['ratio_mean']:.3f}",
            _sec(g["train_seconds_median"]),
        ]
        for g in groups
    ]


GROUP_HEADER = ("config", "seeds", "score (mean ± std)", "× ensemble", "training wall-clock (median)")


def sweep_markdown(
    rows: Sequence[Mapping[str, Any]], groups: Sequence[Mapping[str, Any]], run_id: str
) -> str:
    metric = "top-1 accuracy" if rows[0]["metric"] == "acc" else "mAP"
    return "\n".join(
        [
            f"# Sweep {run_id}: {len(rows)} variants",
            "",
            f"Union {metric} of each variant's TargetNet on the real test split (final models). Training "
            "wall-clock: stage 1, the export and stages 2–3; pipeline wall-clock: all six stages.",
            "",
            "## By config (best first)",
            "",
            reports.markdown_table(GROUP_HEADER, group_rows(groups)),
            "",
            "## By variant",
            "",
            reports.markdown_table(HEADER, markdown_rows(rows)),
            "",
        ]
    )


def sweep_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    tasks = sorted({t for r in rows for t in r["tasks"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    fields = ("variant", "teacher_set", "config", "seed", "metric", "score", "ensemble", "ratio")
    tail = ("train_seconds", "pipeline_seconds", "student", "params", "run_id")
    writer.writerow([*fields, *(f"task.{t}" for t in tasks), *tail])
    for r in rows:
        writer.writerow(
            [r[f] for f in fields] + [r["tasks"].get(t, "") for t in tasks] + [r[f] for f in tail]
        )
    return buf.getvalue()


def sweep_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Score against training wall-clock, one marker per variant, one colour per config; the teachers'
    ensemble as a dashed line per teacher set."""
    plt = reports._pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_name(r), []).append(r)
    timed = all(r["train_seconds"] == r["train_seconds"] for r in rows)
    for i, (group, members) in enumerate(groups.items()):
        xs = [m["train_seconds"] if timed else j for j, m in enumerate(members)]
        ys = [100 * m["score"] for m in members]
        ax.scatter(xs, ys, color=f"C{i % 10}", label=group, s=36, zorder=3)
        for x, y, m in zip(xs, ys, members, strict=True):
            ax.annotate(f"s{m['seed']}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for j, ens in enumerate(sorted({(r["teacher_set"], r["ensemble"]) for r in rows})):
        label = "teachers' ensemble" + (f" ({ens[0]})" if ens[0] else "")
        ax.axhline(100 * ens[1], color="0.4", ls="--", lw=1, label=label if j < 5 else None)
    metric = "accuracy" if rows[0]["metric"] == "acc" else "mAP"
    ax.set_xlabel("training wall-clock (s)" if timed else "variant (wall-clock not published)")
    ax.set_ylabel(f"union {metric} (%)")
    ax.set_title(f"{len(rows)} variants: score against wall-clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_html(
    rows: Sequence[Sequence[str]], groups: Sequence[Mapping[str, Any]], plot: Path, run_id: str
) -> str:
    """A self-contained page (the plot inlined) for the KFP UI's HTML viewer and MLflow."""
    style = (
        "body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dfka sweep</title><style>{style}</style>"
        f"</head><body><h2>dfka sweep <code>{html.escape(run_id)}</code></h2>"
        f"{reports._img(plot, 'union score against training wall-clock, per variant')}"
        f"<h3>By config</h3>{reports.html_table(GROUP_HEADER, group_rows(groups))}"
        f"<h3>By variant</h3>{reports.html_table(HEADER, rows)}</body></html>"
    )


# ---------------------------------------------------------------- MLflow


def _sweep_parent(ctx: RunContext, *, create: bool, names: Sequence[str] = ()) -> ParentRun | None:
    """The sweep's parent run (tags ``dfka.kfp_run_id = <run id>``, ``dfka.kind = sweep``)."""
    if not ctx.track or ctx.tracking_uri is None:
        return None
    client = _client(ctx.tracking_uri)
    if client is None:
        return None
    if not create:
        try:
            found = find_parent(client, ctx.experiment, ctx.run_id, kind="sweep")
        except Exception as err:  # tracking never stops a stage
            log.warning("MLflow: no sweep run for %s: %s", ctx.run_id, redact(str(err))[:300])
            return None
        return ParentRun(client, found) if found else None
    name = f"{ctx.experiment} · sweep of {len(names)} variants · {ctx.run_id.rsplit('-', 1)[-1]}"
    run_id = _find_or_create_parent(client, ctx, None, name, kind="sweep")
    if run_id is None:
        return None
    parent = ParentRun(client, run_id)
    parent.log_params({"sweep.variants": json.dumps(list(names)), "sweep.count": len(names)})
    return parent
