"""What people look at: sample grids, the confusion matrix, the results table (Markdown and HTML)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def sample_grid(
    images: torch.Tensor, scores: torch.Tensor, label_names: Sequence[str], path: Path, per_label: int = 8
) -> Path:
    """Generated images in rows by the label the teachers' union gives them (``per_label`` per row).

    One mosaic image (one ``imshow``), so it stays fast for many labels; empty cells stay black.
    """
    plt = _pyplot()
    pred = scores.argmax(1)
    channels, height, width = images.shape[1:]
    pad = 2
    mosaic = torch.full((channels, len(label_names) * (height + pad), per_label * (width + pad)), 0.35)
    for r in range(len(label_names)):
        for c, i in enumerate(torch.nonzero(pred == r).flatten()[:per_label].tolist()):
            y, x = r * (height + pad), c * (width + pad)
            mosaic[:, y : y + height, x : x + width] = images[i].float().clamp(0, 1)
    fig, ax = plt.subplots(figsize=(1.2 + per_label * 0.6, 0.4 + len(label_names) * 0.6))
    shown = mosaic[0] if channels == 1 else mosaic.permute(1, 2, 0)
    ax.imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(
        [r * (height + pad) + height / 2 for r in range(len(label_names))], list(label_names), fontsize=8
    )
    ax.set_xticks([])
    ax.set_title("generated samples by teacher-union label", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def confusion_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> Path:
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.8 + 0.45 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(row) for row in matrix), default=1) or 1
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            ax.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if value > peak / 2 else "black",
            )
    ax.set_title("TargetNet confusion matrix (test split)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- numbers


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------- ingestion


def teacher_report_markdown(report: Mapping[str, Any], digest: str) -> str:
    rows = []
    for name, t in report["teachers"].items():
        labels = t["labels"]
        span = f"{labels[0]}..{labels[-1]}" if len(labels) > 3 else ", ".join(labels)
        rows.append(
            [
                name,
                t["task"],
                span,
                str(len(t["target_labels"])),
                human(t["params"]),
                human(t["flops"]),
                t.get("source", ""),
            ]
        )
    shared = ", ".join(report["shared_labels"]) or "none"
    dropped = ", ".join(report.get("dropped", [])) or "none"
    return "\n".join(
        [
            "# Teacher set",
            "",
            markdown_table(["teacher", "task", "labels", "in Y_cst", "params", "FLOPs", "bundle"], rows),
            "",
            f"- Y_cst ({len(report['target_labels'])} labels): {', '.join(report['target_labels'])}",
            f"- labels owned by more than one teacher: {shared}",
            f"- teachers dropped (no label in Y_cst): {dropped}",
            f"- all teachers: {human(report['params_total'])} params, {human(report['flops_total'])} FLOPs",
            f"- config hash: `{digest}`",
            "",
        ]
    )


# ---------------------------------------------------------------- evaluation


def results_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The results table: each teacher on its labels, the ensemble and the TargetNet on the union and tasks."""
    metric = results["metric"]
    teachers = list(results["teachers"])
    header = ["model", "params", "FLOPs", f"Y_cst {metric}", *[f"{t} labels" for t in teachers]]
    rows = []
    for name, t in results["teachers"].items():
        rows.append(
            [f"teacher {name}", human(t["params"]), human(t["flops"]), "–"]
            + [pct(t["own"]) if other == name else "–" for other in teachers]
        )
    ens = results["ensemble"]
    rows.append(
        ["teacher ensemble", human(ens["params"]), human(ens["flops"]), pct(ens["union"])]
        + [pct(ens["tasks"][t]) for t in teachers]
    )
    st = results["student"]
    rows.append(
        [f"TargetNet ({st['spec']})", human(st["params"]), human(st["flops"]), pct(st["union"])]
        + [pct(st["tasks"][t]) for t in teachers]
    )
    return header, rows


def headline_scores(results: Mapping[str, Any]) -> dict[str, float]:
    """The numbers that say which run is best (``score.*``, first in MLflow's sorted metric lists): the
    TargetNet's union score, the ensemble's, their ratio, the size ratio, and per teacher its own score
    and the TargetNet's on its labels."""
    student, ensemble = results["student"], results["ensemble"]
    union, reference = float(student["union"]), float(ensemble["union"])
    scores = {
        "score.union": union,
        "score.ensemble": reference,
        "score.ratio_to_ensemble": union / reference if reference > 0 else math.nan,
        "score.params_ratio": student["params"] / max(1, ensemble["params"]),
    }
    for name, teacher in results["teachers"].items():
        scores[f"score.teacher.{name}"] = float(teacher["own"])
        scores[f"score.student.{name}"] = float(student["tasks"][name])
    return scores


def verdict(results: Mapping[str, Any]) -> str:
    """One line: ``TargetNet (lenet5:1.0) 94.98% accuracy on the mnist test split: 0.998 × the teachers'
    ensemble (95.22%), with 0.50 × their parameters.``"""
    s = headline_scores(results)
    metric = "accuracy" if results["metric"] == "top-1 accuracy" else results["metric"]
    return (
        f"TargetNet ({results['student']['spec']}) {pct(s['score.union'])} {metric} on the "
        f"{results['dataset']} test split: {s['score.ratio_to_ensemble']:.3f} × the teachers' ensemble "
        f"({pct(s['score.ensemble'])}), with {s['score.params_ratio']:.2f} × their parameters."
    )


def per_label_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["label", "TargetNet", "ensemble"]
    rows = [
        [label, pct(results["per_label"]["student"][label]), pct(results["per_label"]["ensemble"][label])]
        for label in results["labels"]
    ]
    return header, rows


def results_markdown(results: Mapping[str, Any], links: Mapping[str, str] | None = None) -> str:
    header, rows = results_rows(results)
    label_header, label_rows = per_label_rows(results)
    lines = [
        "# dfka results",
        "",
        f"Test split of `{results['dataset']}` ({results['images']} images, {len(results['labels'])} labels in Y_cst). "
        f"Metric: {results['metric']}. Final model, no checkpoint selection on the test set.",
        "",
        markdown_table(header, rows),
        "",
        "## Per label",
        "",
        markdown_table(label_header, label_rows),
        "",
    ]
    if links:
        lines += ["## Links", ""] + [f"- {k}: {v}" for k, v in links.items()] + [""]
    return "\n".join(lines)


def _img(path: Path | None, alt: str) -> str:
    if path is None or not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/><figcaption>{html.escape(alt)}</figcaption></figure>'


def results_html(
    results: Mapping[str, Any],
    *,
    grid: Path | None = None,
    confusion: Path | None = None,
    links: Mapping[str, str] | None = None,
) -> str:
    """A self-contained page (images inlined) for the KFP UI's HTML viewer and MLflow."""
    header, rows = results_rows(results)
    label_header, label_rows = per_label_rows(results)
    link_items = "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in (links or {}).items()
    )
    style = (
        "body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>dfka results</title><style>{style}</style></head><body>"
        f"<h2>dfka results</h2><p>Test split of <b>{html.escape(results['dataset'])}</b>, {results['images']} images, "
        f"metric {html.escape(results['metric'])}.</p>"
        f"{html_table(header, rows)}"
        f"{_img(grid, 'generated samples (no real data) by teacher-union label')}"
        f"{_img(confusion, 'TargetNet confusion matrix')}"
        f"<h3>Per label</h3>{html_table(label_header, label_rows)}"
        f"{'<h3>Links</h3><ul>' + link_items + '</ul>' if link_items else ''}"
        "</body></html>"
    )
