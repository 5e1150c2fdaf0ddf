"""Tables, plots and sample grids from a benchmark's ``<name>.json``; the summary and the README block.

Everything here is regenerated from the result files alone (``dfka bench report``), so a table can be
rebuilt, restyled or merged without re-running anything.
"""

from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dfka.bench.config import DATA_FREE, KIND, METHODS, WITH_DATA
from dfka.bench.machine import describe_all, is_clean_commit
from dfka.bench.results import atomic_write, csv_path, json_path, load_results, sorted_runs, write_csv
from dfka.engine.probe import time_to_reach
from dfka.errors import ConfigError
from dfka.evaluation import task_key, teacher_key

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
METRIC_NAME = {"acc": "top-1 accuracy", "map": "mAP"}
#: "time to REACH × ensemble", read off the accuracy-vs-time curves (dev probe set)
REACH = 0.95


# --- statistics ----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def total_seconds(run: dict[str, Any]) -> float:
    return sum(s.get("seconds", 0.0) for s in run.get("stages", {}).values())


def method_stats(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method (successful runs only): seeds, and mean ± std of every metric and stage time."""
    out: dict[str, dict[str, Any]] = {}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in sorted_runs(data):
        if run["status"] == "ok":
            by_method.setdefault(run["method"], []).append(run)
    for method, runs in by_method.items():
        stats: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "runs": runs}
        keys = {k for r in runs for k in r.get("metrics", {})}
        for k in keys:
            stats[k] = mean_std([r["metrics"].get(k) for r in runs])
        stats["seconds.total"] = mean_std([total_seconds(r) for r in runs])
        stages = list(dict.fromkeys(s for r in runs for s in r.get("stages", {})))
        stats["stages"] = stages
        for s in stages:
            stats[f"seconds.{s}"] = mean_std([r["stages"].get(s, {}).get("seconds") for r in runs])
            stats[f"samples_per_second.{s}"] = mean_std(
                [r["stages"].get(s, {}).get("samples_per_second") for r in runs]
            )
            stats[f"steps.{s}"] = mean_std([r["stages"].get(s, {}).get("steps") for r in runs])
        stats["params"] = runs[0].get("params")
        stats["flops"] = runs[0].get("flops")
        stats["budgets"] = sorted({r.get("budget_minutes") for r in runs if r.get("budget_minutes")})
        stats["threads"] = sorted({r.get("threads") for r in runs if r.get("threads")})
        stats["time_to_reach"] = _times_to_reach(data, runs)
        out[method] = stats
    return out


def probe_target(data: dict[str, Any]) -> float | None:
    """``REACH`` × the ensemble's union metric on the probe set (the curves' reference), if recorded."""
    ens = data.get("reference", {}).get("probe", {}).get("ensemble")
    return REACH * ens if ens is not None else None


def _times_to_reach(data: dict[str, Any], runs: list[dict[str, Any]]) -> list[float | None] | None:
    """Per run with a curve: the first probe time at ``probe_target``, None where it never got there."""
    target = probe_target(data)
    curves = [r["curve"] for r in runs if r.get("curve", {}).get("seconds")]
    if target is None or not curves:
        return None
    return [time_to_reach(c, target) for c in curves]


def reach_text(times: list[float | None] | None) -> str:
    """``95 s`` (every seed), ``95 s (2/3)`` (mean of the seeds that got there), ``not reached``, ``—``."""
    if not times:
        return "—"
    hit = [t for t in times if t is not None]
    if not hit:
        return "not reached"
    text = f"{statistics.fmean(hit):.0f} s"
    return text if len(hit) == len(times) else f"{text} ({len(hit)}/{len(times)})"


# --- formatting ----------------------------------------------------------------------------------------


def pct(ms: tuple[float, float] | None, n: int = 1) -> str:
    if ms is None:
        return "—"
    mean, std = ms
    return f"{100 * mean:.2f}" if n <= 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"


def secs(ms: tuple[float, float] | None, n: int = 1) -> str:
    if ms is None:
        return "—"
    mean, std = ms
    return f"{mean:.0f}" if n <= 1 or std < 0.5 else f"{mean:.0f} ± {std:.0f}"


def human(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _budget_text(method: str, stats: dict[str, Any]) -> str:
    if method == "ensemble":
        return "—"
    budgets = stats.get("budgets") or []
    text = "/".join(f"{b:g}" for b in budgets) + " min" if budgets else "—"
    return text + (" (real data)" if method in WITH_DATA else "")


# --- the per-benchmark markdown -----------------------------------------------------------------------


def _split_text(cfg: dict[str, Any]) -> str:
    if cfg.get("eval_split", "test") == "dev":
        return "**dev** images (a fixed subset of the training split, for tuning: not the reported numbers)"
    return "real test images"


def benchmark_markdown(data: dict[str, Any]) -> str:
    name, m = data["benchmark"], data["metric"]
    ref = data.get("reference", {})
    stats = method_stats(data)
    teachers = list(data["teachers"])
    cfg = data["config"]
    machine = data.get("machine", {})
    lines = [f"# Benchmark `{name}`", ""]
    if data.get("description"):
        lines += [data["description"], ""]
    labels = data["label_set"]
    span = f"{labels[0]}..{labels[-1]}" if len(labels) > 3 else ", ".join(labels)
    lines += [
        f"- **Y_cst**: {len(labels)} labels ({span}). Evaluated on {ref.get('test_images', '?')} {_split_text(cfg)} "
        f"of `{cfg['dataset']}` with labels in Y_cst; metric: {METRIC_NAME[m]} (%). A teacher column is the "
        + (
            "method on that teacher's labels only (its test images, argmax restricted to its labels)."
            if m == "acc"
            else "method's mAP over that teacher's labels."
        ),
        "- **Final models only** (no best-epoch selection on the test set); mean ± std over the seeds shown.",
        f"- **Budgets**: data-free methods ({', '.join(DATA_FREE)}) get the same wall-clock per seed; "
        f"{', '.join(WITH_DATA)} learn from real unlabeled training images and are references, not competitors.",
        "- **Wall-clock** counts training stages only (teacher training and evaluation are excluded; dfka's "
        "includes its sample export and regroup). `agreement`: how often the model predicts what the ensemble does.",
        f"- **Time to {REACH:g}× ensemble**: the first wall-clock at which the model scored {REACH:g}× the "
        "ensemble's union metric on the probe set (the dev split's first "
        f"{ref.get('probe', {}).get('images', '?')} training images, scored {ref.get('probe', {}).get('points', '?')} "
        "times per budget outside the budget; never used to pick a model); mean over the seeds that got "
        "there. A method has a curve from its first complete model on (dfka: from the fine-tune).",
        f"- **Machine**: {_machines([data])}; updated {data.get('updated', '?')}"
        + (f"; code {machine['git']}" if machine.get("git") else "")
        + ".",
        "",
    ]
    header = ["method", "kind", f"union {m}"] + [f"{t}" for t in teachers]
    header += ["agreement", "params", "FLOPs", "budget", "seconds", f"time to {REACH:g}× ensemble"]
    header += ["seconds per stage", "seeds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tp, tf = ref.get("teachers_params"), ref.get("teachers_flops")
    for t in teachers:
        rec = data["teachers"][t]
        own = ref.get("teachers", {}).get(teacher_key(t, m))
        cells = [f"teacher `{t}`", "teacher, own labels", "—"]
        cells += [pct((own, 0.0)) if u == t and own is not None else "—" for u in teachers]
        per = ref.get("per_teacher", {}).get(t, {})
        epochs = rec.get("epochs")
        cells += [
            "—",
            human(per.get("params")),
            human(per.get("flops")),
            f"{epochs} epochs" if epochs else "—",
            secs((rec["train_seconds"], 0.0)) if rec.get("train_seconds") else "—",
            "—",
            "train (real labels)",
            "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for method in METHODS:
        if method not in stats:
            continue
        s = stats[method]
        n = len(s["seeds"])
        cells = [f"**{method}**" if method == "dfka" else method, KIND[method], pct(s.get(m), n)]
        cells += [pct(s.get(task_key(t, m)), n) for t in teachers]
        params, flops = s.get("params"), s.get("flops")
        cells += [
            pct(s.get("agreement"), n),
            human(params) + (f" ({params / tp:.2f}×)" if params and tp else ""),
            human(flops) + (f" ({flops / tf:.2f}×)" if flops and tf else ""),
            _budget_text(method, s),
            secs(s.get("seconds.total"), n),
            "—" if method == "ensemble" else reach_text(s.get("time_to_reach")),
            " · ".join(f"{st} {secs(s.get(f'seconds.{st}'))}" for st in s["stages"]) or "—",
            str(n),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Params and FLOPs in parentheses: relative to the teachers combined. FLOPs: 2 per multiply-add, one image."
    )
    lines.append("")

    throughput = [
        (method, st, s)
        for method in METHODS
        if (s := stats.get(method))
        for st in s["stages"]
        if s.get(f"samples_per_second.{st}")
    ]
    if throughput:
        lines += ["## Throughput", "", "| method | stage | steps | samples/s |", "|---|---|---|---|"]
        for method, st, s in throughput:
            steps = s.get(f"steps.{st}")
            sps = s.get(f"samples_per_second.{st}")
            lines.append(f"| {method} | {st} | {steps[0]:.0f} | {sps[0]:.0f} |")
        lines.append("")

    notes = consistency_notes(data, stats)
    dirty = uncommitted_rows([data])
    if dirty:
        notes.append("**not from committed code**: " + ", ".join(dirty))
    failed = [r for r in sorted_runs(data) if r["status"] != "ok"]
    if notes or failed:
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in notes]
        for r in failed:
            first = (r.get("error") or "").splitlines()[0] if r.get("error") else "unknown error"
            lines.append(f"- **failed**: {r['method']} seed {r['seed']}: {first}")
        lines.append("")

    files = [f"[{csv_path('.', name).name}]({csv_path('.', name).name})", f"[{name}.json]({name}.json)"]
    lines += [
        "## Files",
        "",
        "- " + ", ".join(files),
        f"- ![accuracy vs wall-clock]({name}-accuracy-vs-time.png)",
    ]
    for method in METHODS:
        if any(r.get("samples_file") and r["method"] == method for r in data["runs"].values()):
            lines.append(f"- samples seen by `{method}`: ![{method}]({name}-samples-{method}.png)")
    return "\n".join(lines) + "\n"


def consistency_notes(data: dict[str, Any], stats: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings when rows that should be comparable are not (different budgets or threads)."""
    notes = []
    free = {m: stats[m] for m in DATA_FREE if m in stats}
    budgets = {b for s in free.values() for b in s["budgets"]}
    if len(budgets) > 1:
        detail = ", ".join(f"{m}: {'/'.join(f'{b:g}' for b in s['budgets'])} min" for m, s in free.items())
        notes.append(f"data-free methods ran with different budgets ({detail}): not an equal-time comparison")
    threads = {t for s in free.values() for t in s["threads"]}
    if len(threads) > 1:
        detail = ", ".join(f"{m}: {'/'.join(map(str, s['threads']))}" for m, s in free.items())
        notes.append(f"data-free methods ran with different thread counts ({detail})")
    seeds = {tuple(s["seeds"]) for m, s in stats.items() if m != "ensemble"}
    if len(seeds) > 1:
        notes.append(
            "methods ran on different seed sets: " + ", ".join(f"{m}: {s['seeds']}" for m, s in stats.items())
        )
    return notes


# --- plots -----------------------------------------------------------------------------------------------


def mean_curve(curves: list[dict[str, list[float]]], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over seeds of step-wise curves on ``grid``: each seed holds its last probe value
    (NaN before its first probe and after its last one), so a seed counts only where it has a model."""
    rows = []
    for c in curves:
        t, v = np.asarray(c["seconds"], float), np.asarray(c["values"], float)
        at = np.searchsorted(t, grid, side="right") - 1
        row = np.where(at >= 0, v[np.clip(at, 0, None)], np.nan)
        row[grid > t[-1]] = np.nan
        rows.append(row)
    block = np.vstack(rows)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no seed has a model there
        return np.nanmean(block, 0), np.nanstd(block, 0)


def plot_accuracy_vs_time(data: dict[str, Any], path: Path) -> Path:
    """Left: the union metric on the probe set during training, mean ± std over seeds, per method, with
    the ensemble and ``REACH`` × ensemble. Right: final models on the evaluation split, one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = data["metric"]
    stats = method_stats(data)
    fig, (curves_ax, ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    markers = {
        "dfka": "*",
        "dfka-paper": "P",
        "dafl": "o",
        "dfad": "s",
        "noise": "x",
        "kd-real": "^",
        "layerwise": "v",
    }
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}
    probe = data.get("reference", {}).get("probe", {})
    if probe.get("ensemble") is not None:
        e = 100 * probe["ensemble"]
        curves_ax.axhline(e, color="0.4", ls="--", lw=1, label=f"ensemble {e:.2f}")
        curves_ax.axhline(REACH * e, color="0.6", ls=":", lw=1, label=f"{REACH:g}× ensemble")
    drawn = False
    for method in METHODS:
        s = stats.get(method)
        curves = [r["curve"] for r in (s or {}).get("runs", []) if r.get("curve", {}).get("seconds")]
        if method == "ensemble" or not curves:
            continue
        end = max(c["seconds"][-1] for c in curves)
        grid = np.linspace(0.0, end, 200)
        mean, std = mean_curve(curves, grid)
        hollow = method in WITH_DATA
        curves_ax.plot(
            grid,
            100 * mean,
            color=colors[method],
            ls="--" if hollow else "-",
            lw=2 if method == "dfka" else 1.2,
            label=f"{method}{' (real data)' if hollow else ''}",
        )
        curves_ax.plot(grid[-1], 100 * mean[-1], marker=markers.get(method, "o"), color=colors[method], ms=6)
        curves_ax.fill_between(grid, 100 * (mean - std), 100 * (mean + std), color=colors[method], alpha=0.15)
        drawn = True
    curves_ax.set_xlabel("training wall-clock (s)")
    curves_ax.set_ylabel(f"union {METRIC_NAME[m]} on the probe set (%)")
    curves_ax.set_title(
        f"during training: {probe.get('images', '?')} dev images, mean ± std over seeds"
        if drawn
        else "no curves recorded (runs older than the probe)",
        fontsize=10,
    )
    curves_ax.grid(alpha=0.3)
    if drawn:
        curves_ax.legend(fontsize=7, loc="lower right")

    ens = data.get("reference", {}).get("ensemble", {}).get(m)
    if ens is not None:
        ax.axhline(100 * ens, color="0.4", ls="--", lw=1, label=f"ensemble {100 * ens:.2f}")
    for method in METHODS:
        s = stats.get(method)
        if method == "ensemble" or s is None or s.get(m) is None:
            continue
        (y, ey), (x, ex) = s[m], s["seconds.total"]
        hollow = method in WITH_DATA
        ax.errorbar(
            x,
            100 * y,
            xerr=ex,
            yerr=100 * ey,
            fmt=markers.get(method, "o"),
            color=colors[method],
            ms=11 if method == "dfka" else 7,
            mfc="none" if hollow else None,
            capsize=3,
            label=f"{method}{' (real data)' if hollow else ''}",
        )
    ax.set_xlabel("training wall-clock per run (s)")
    ax.set_ylabel(f"union {METRIC_NAME[m]} (%)")
    n = max((len(s["seeds"]) for s in stats.values()), default=0)
    split = "dev" if data.get("config", {}).get("eval_split") == "dev" else "test"
    ax.set_title(
        f"{data['benchmark']}: final models on the {split} split, mean ± std over {n} seed(s)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.text(0.01, 0.01, _machines([data]), fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_grid(images: np.ndarray, path: Path, columns: int = 8, title: str | None = None) -> Path:
    """Save up to ``columns²`` images ``(N, C, H, W)`` in [0, 1] as one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.clip(images.astype(np.float32)[: columns * columns], 0, 1)
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    fig, ax = plt.subplots(figsize=(columns * 0.6 + 0.4, rows * 0.6 + (0.6 if title else 0.3)))
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sample_grids(out_dir: Path, data: dict[str, Any]) -> list[Path]:
    """One grid per method with samples: from its lowest seed's saved images."""
    paths = []
    for method in METHODS:
        runs = [r for r in sorted_runs(data) if r["method"] == method and r.get("samples_file")]
        for run in runs:
            src = out_dir / run["samples_file"]
            if src.is_file():
                images = np.load(src, allow_pickle=False)
                title = f"{data['benchmark']}: {method} training inputs (seed {run['seed']})"
                paths.append(
                    sample_grid(images, out_dir / f"{data['benchmark']}-samples-{method}.png", title=title)
                )
                break
    return paths


def write_benchmark_outputs(out_dir: str | Path, name: str) -> dict[str, Path | list[Path]]:
    """Regenerate the CSV, markdown, plot and sample grids of benchmark ``name`` from its JSON."""
    out = Path(out_dir)
    data = load_results(json_path(out, name))
    if data is None:
        raise ConfigError(f"no results for benchmark {name!r} in {out}", f"run `dfka bench run {name}` first")
    md = out / f"{name}.md"
    atomic_write(md, benchmark_markdown(data))
    return {
        "csv": write_csv(out, data),
        "markdown": md,
        "plot": plot_accuracy_vs_time(data, out / f"{name}-accuracy-vs-time.png"),
        "grids": write_sample_grids(out, data),
    }


# --- the summary and the README block --------------------------------------------------------------------


def all_results(out_dir: str | Path) -> list[dict[str, Any]]:
    out = Path(out_dir)
    found = [load_results(p) for p in sorted(out.glob("*.json")) if ".stale-" not in p.name]
    return [d for d in found if d is not None]


def headline_table(datas: list[dict[str, Any]], link_prefix: str = "") -> str:
    """Benchmarks × methods: the union metric, mean ± std over seeds, plus each teacher on its labels;
    the best data-free mean of each row in bold; a cell over fewer seeds than its row's others says so."""
    order = ["digits", "fashion", "three-teachers", "cross-domain", "multilabel", "custom-subset"]
    datas = sorted(
        datas, key=lambda d: (order.index(d["benchmark"]) if d["benchmark"] in order else 99, d["benchmark"])
    )
    methods = [m for m in METHODS if any(m in method_stats(d) for d in datas)]
    reach = [m for m in ("dfka", "dfka-paper", "dafl", "dfad") if m in methods]
    header = ["benchmark", "metric", "teachers (own labels)", *methods, "budget"]
    header.append(f"time to {REACH:g}× ensemble ({' / '.join(reach)})")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d in datas:
        m = d["metric"]
        stats = method_stats(d)
        teachers = d.get("reference", {}).get("teachers", {})
        own = " / ".join(pct((v, 0.0)) for v in teachers.values() if v is not None) or "—"
        cells = [f"[{d['benchmark']}]({link_prefix}{d['benchmark']}.md)", m, own]
        best = _best_data_free(stats, m)
        full = max((len(s["seeds"]) for k, s in stats.items() if k != "ensemble"), default=0)
        for method in methods:
            s = stats.get(method)
            cell = pct(s.get(m), len(s["seeds"])) if s else "—"
            if s and method != "ensemble" and len(s["seeds"]) < full:  # fewer seeds than the row's others
                cell += f" ({len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''})"
            cells.append(f"**{cell}**" if method == best else cell)
        budgets = sorted({b for mm in DATA_FREE if mm in stats for b in stats[mm]["budgets"]})
        cells.append("/".join(f"{b:g}" for b in budgets) + " min" if budgets else "—")
        cells.append(
            " / ".join(reach_text(stats[mm].get("time_to_reach")) if mm in stats else "—" for mm in reach)
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best_data_free(stats: dict[str, dict[str, Any]], metric: str) -> str | None:
    """The data-free method with the highest mean union metric (bold in the table)."""
    means = {m: s[metric][0] for m in DATA_FREE if (s := stats.get(m)) and s.get(metric)}
    return max(means, key=means.get) if means else None


def _machines(datas: list[dict[str, Any]]) -> str:
    """The machines the shown runs ran on (each run keeps its own record; the header only the last's)."""
    machines = [r["machine"] for d in datas for r in d.get("runs", {}).values() if r.get("machine")]
    return describe_all(machines or [d.get("machine", {}) for d in datas])


def _dates(datas: list[dict[str, Any]]) -> str:
    dates = sorted({str(d.get("updated", ""))[:10] for d in datas if d.get("updated")})
    return dates[-1] if len(dates) == 1 else (f"{dates[0]} to {dates[-1]}" if dates else "?")


def summary_markdown(datas: list[dict[str, Any]]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Updated {_dates(datas)} on {_machines(datas)}. Final models only; mean ± std over seeds; "
        "data-free methods (dfka, dafl, dfad, noise) at equal wall-clock per benchmark; kd-real and layerwise "
        "learn from real unlabeled images (references). Union metric in %; per-benchmark tables have the "
        "per-teacher columns, params, FLOPs and wall-clock per stage.",
        "",
        headline_table(datas),
        "",
        "Regenerate with `dfka bench report` (tables, plots, this page) or `dfka bench report --update-readme`.",
    ]
    return "\n".join(lines) + "\n"


def readme_block(datas: list[dict[str, Any]], results_dir: str = "benchmarks/results") -> str:
    prefix = results_dir.rstrip("/") + "/"
    return "\n".join(
        [
            f"_Headline results, regenerated by `dfka bench report --update-readme` on {_dates(datas)}; "
            f"machine: {_machines(datas)}. Final models, mean ± std over seeds; union metric in %. "
            f"Full tables: [{prefix}README.md]({prefix}README.md)._",
            "",
            headline_table(datas, link_prefix=prefix),
        ]
    )


def update_readme(readme: str | Path, block: str) -> Path:
    """Replace what lies between the ``bench:start``/``bench:end`` markers of ``readme`` with ``block``."""
    path = Path(readme)
    if not path.is_file():
        raise ConfigError(f"{path} not found", "run from the repository root or pass --readme PATH")
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0 or end < start:
        raise ConfigError(
            f"{path} has no {README_START} ... {README_END} block",
            "add the two marker lines where the headline table should go",
        )
    new = text[: start + len(README_START)] + "\n" + block.strip() + "\n" + text[end:]
    atomic_write(path, new)
    return path


def uncommitted_rows(datas: list[dict[str, Any]]) -> list[str]:
    """``benchmark method/seed (code)`` of every row not run on a clean, known commit."""
    rows = []
    for d in datas:
        for r in sorted_runs(d):
            if r["method"] != "ensemble" and not is_clean_commit(r.get("machine", {}).get("git")):
                rows.append(
                    f"{d['benchmark']} {r['method']}/{r['seed']} ({r.get('machine', {}).get('git') or 'unknown commit'})"
                )
    return rows


def write_report(
    out_dir: str | Path, readme: str | Path | None = None, *, allow_dirty: bool = False
) -> dict[str, Any]:
    """Regenerate every benchmark's outputs in ``out_dir`` and its summary; optionally the README block.
    Refuses rows that ran on uncommitted code (or an unknown commit) unless ``allow_dirty``."""
    out = Path(out_dir)
    datas = all_results(out)
    if not datas:
        raise ConfigError(f"no benchmark results in {out}", "run `dfka bench run NAME --out DIR` first")
    dirty = uncommitted_rows(datas)
    if dirty and not allow_dirty:
        shown = ", ".join(dirty[:4]) + (f" and {len(dirty) - 4} more" if len(dirty) > 4 else "")
        raise ConfigError(
            f"{len(dirty)} result row(s) in {out} ran on uncommitted code: {shown}",
            "commit, re-run those rows (`dfka bench run NAME --methods M --seeds S`) from the clean checkout, "
            "or pass --allow-dirty to publish them marked as uncommitted",
        )
    written: dict[str, Any] = {d["benchmark"]: write_benchmark_outputs(out, d["benchmark"]) for d in datas}
    summary = out / "README.md"
    atomic_write(summary, summary_markdown(datas))
    written["summary"] = summary
    if readme is not None:
        try:
            rel = str(out.resolve().relative_to(Path(readme).resolve().parent))
        except ValueError:
            rel = str(out)
        written["readme"] = update_readme(readme, readme_block(datas, rel))
    return written
