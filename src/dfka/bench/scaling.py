"""Cost growth: how a training step's time and a run's memory grow with the teacher set and the student.

One factor at a time around a base point (2 LeNet-5 teachers of 5 labels each, a LeNet-5 student, batch
64):

* **teachers** M = 2, 3, 5, 8 (each with its own 5 labels, so Y_cst grows with M: 10 → 40 labels);
* **teacher width**: LeNet-5 ×0.5, ×1, ×2 (every teacher);
* **student width**: LeNet-5 ×0.5, ×1, ×2;
* **batch**: 32, 64, 128, 256 (stage 1, stage 2 and the fine-tune alike).

Per point, the median wall-clock of single training steps of stage 1 (the GAN step, trajectory
collector attached), the sample export (no gradients), stage 2 (the mean over the blocks of a block's
step) and the fine-tune, on the fast path (:func:`dfka.bench.throughput.build_steps` builds them);
every point is timed in one process in interleaved rounds, so that the machine's load hits all points
alike. Memory: in a fresh process per point, its peak resident memory above what it held after
importing torch and dfka (the teachers, the generator, the student, a 1,024-sample bank and every
step's activations; all stages are built in that process, so memory is per point, not per stage).
Teachers are untrained with plausible BN statistics: speed and memory do not depend on the weights.

Growth is fitted per stage: against M a straight line :math:`t = a + bM` (with :math:`R^2`, and
:math:`t(8)/t(2)`), against widths and the batch the exponent :math:`k` of :math:`t \\propto x^k`
(least squares in log-log).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dfka.errors import ConfigError

FACTORS: dict[str, tuple[float, ...]] = {
    "teachers": (2, 3, 5, 8),
    "teacher_width": (0.5, 1.0, 2.0),
    "student_width": (0.5, 1.0, 2.0),
    "batch": (32, 64, 128, 256),
}
LABELS_PER_TEACHER = 5
#: the stages reported, in pipeline order (throughput's step names map onto them)
STAGES = ("gan", "export", "blocks", "finetune")
TITLES = {
    "teachers": "teachers M",
    "teacher_width": "teacher width (LeNet-5 ×)",
    "student_width": "student width (LeNet-5 ×)",
    "batch": "batch size",
}


@dataclass(frozen=True)
class Point:
    teachers: int = 2
    teacher_width: float = 1.0
    student_width: float = 1.0
    batch: int = 64

    def label(self) -> str:
        return (
            f"M={self.teachers} teachers lenet5:{self.teacher_width:g} student lenet5:{self.student_width:g} "
            f"batch {self.batch}"
        )


BASE = Point()


def grid(
    factors: Sequence[str] = tuple(FACTORS), values: dict[str, Sequence[float]] | None = None
) -> list[Point]:
    """The points to measure: the base, then each factor's values with the others at the base (the base
    is measured once even where a factor's values include it)."""
    unknown = sorted(set(factors) - set(FACTORS))
    if unknown:
        raise ConfigError(f"unknown scaling factor(s) {unknown}", f"use any of {', '.join(FACTORS)}")
    values = values or {}
    points = [BASE]
    for factor in factors:
        for v in values.get(factor, FACTORS[factor]):
            cast = int(v) if factor in ("teachers", "batch") else float(v)
            low = {"teachers": 2, "batch": 2}.get(factor)
            if (low is not None and cast < low) or not (0 < cast < 1e4) or cast != v:
                raise ConfigError(
                    f"scaling: {factor} = {v!r} cannot be measured",
                    "teachers and batch are whole numbers >= 2 (amalgamation needs two teachers), widths > 0",
                )
            p = replace(BASE, **{factor: cast})
            if p not in points:
                points.append(p)
    return points


def _setup(point: Point) -> tuple[list[Any], Any]:
    """The synthetic teachers and the amalgamation config of one point."""
    from dfka.amalgamation.config import AmalgamationConfig
    from dfka.bench import throughput

    bundles = throughput.synthetic_teachers(
        f"lenet5:{point.teacher_width:g}", count=point.teachers, classes=point.teachers * LABELS_PER_TEACHER
    )
    labels = [label for b in bundles for label in b.manifest.labels]
    batch = {"batch_size": point.batch}
    cfg = AmalgamationConfig.model_validate(
        {
            "student": f"lenet5:{point.student_width:g}",
            "target_labels": labels,
            "gan": batch,
            "blocks": batch,
            "regroup": batch,
        }
    )
    return bundles, cfg


def _stage_steps(bundles: list[Any], cfg: Any) -> dict[str, list[Callable[[], Any]]]:
    """One point's training steps by reported stage (``blocks``: one step function per block)."""
    import torch

    from dfka.bench import throughput

    built = throughput.build_steps(bundles, cfg, torch.device("cpu"))
    out: dict[str, list[Callable[[], Any]]] = {s: [] for s in STAGES}
    names = {"stage1": "gan", "export": "export", "finetune": "finetune"}
    for name, (_, step) in built.items():
        out[names.get(name, "blocks")].append(step)
    return out


def memory_of(point: Point, warmup: int = 2) -> dict[str, Any]:
    """Peak resident memory of one point above what the process held after its imports: build every
    training step and run each ``warmup`` times. Call it in a fresh process (the peak is the process's)."""
    import resource

    import psutil

    from dfka.models import count_params

    baseline = psutil.Process().memory_info().rss
    bundles, cfg = _setup(point)
    for steps in _stage_steps(bundles, cfg).values():
        for step in steps:
            for _ in range(warmup):
                step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {
        "peak_memory_mb": max(0.0, (peak - baseline) / 2**20),
        "teacher_params": sum(count_params(b.model) for b in bundles),
        "labels": point.teachers * LABELS_PER_TEACHER,
    }


def time_points(
    points: Sequence[Point],
    *,
    threads: int = 1,
    rounds: int = 5,
    steps_per_round: int = 4,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, float]]:
    """Median seconds per step of every stage at every point, timed in one process in interleaved
    rounds (every point's steps once per round), so that a change in the machine's load hits all
    points alike; ``blocks`` is the mean over the blocks of their medians."""
    from dfka.bench.throughput import set_threads

    say = progress or (lambda _msg: None)
    set_threads(threads)
    built = []
    for i, point in enumerate(points, 1):
        say(f"building {i}/{len(points)}: {point.label()}")
        built.append(_stage_steps(*_setup(point)))
    for steps in built:
        for fns in steps.values():
            for fn in fns:
                for _ in range(warmup):
                    fn()
    times = [{(s, j): [] for s, fns in steps.items() for j in range(len(fns))} for steps in built]
    for r in range(rounds):
        say(f"timing round {r + 1}/{rounds}")
        for steps, record in zip(built, times):
            for s, fns in steps.items():
                for j, fn in enumerate(fns):
                    for _ in range(steps_per_round):
                        start = time.perf_counter()
                        fn()
                        record[(s, j)].append(time.perf_counter() - start)
    out = []
    for steps, record in zip(built, times):
        medians = {}
        for s, fns in steps.items():
            per_fn = [statistics.median(record[(s, j)]) for j in range(len(fns))]
            medians[s] = sum(per_fn) / len(per_fn)
        out.append(medians)
    return out


def run_scaling(
    points: Sequence[Point],
    *,
    threads: int = 1,
    rounds: int = 5,
    steps_per_round: int = 4,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Memory per point, each in its own process (``python -m dfka.bench.scaling``), then the step
    times of all points interleaved in this one; and the fits."""
    from dfka.bench.machine import machine_info
    from dfka.bench.throughput import load_average

    say = progress or (lambda _msg: None)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    load_before = load_average()
    memory = []
    for i, point in enumerate(points, 1):
        say(f"memory {i}/{len(points)}: {point.label()}")
        args = [sys.executable, "-m", "dfka.bench.scaling", json.dumps(asdict(point))]
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"measuring {point.label()} failed: {tail}")
        memory.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    seconds = time_points(
        points, threads=threads, rounds=rounds, steps_per_round=steps_per_round, progress=say
    )
    results = [{"point": asdict(p), "seconds": t, **m} for p, t, m in zip(points, seconds, memory)]
    return {
        "format": "dfka.scaling/v1",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(threads=threads, jobs=1),
        "threads": threads,
        "rounds": rounds,
        "steps_per_round": steps_per_round,
        "labels_per_teacher": LABELS_PER_TEACHER,
        "load": [load_before, load_average()],
        "seconds_wall": time.perf_counter() - started,
        "points": results,
        "fits": fit_growth(results),
    }


# --- fits ---------------------------------------------------------------------------------------------


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: ``(a, b, R²)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def _along(results: Sequence[dict[str, Any]], factor: str) -> list[dict[str, Any]]:
    """The points where only ``factor`` differs from the base (the base included), in factor order."""
    base = asdict(BASE)
    out = [r for r in results if all(r["point"][k] == v for k, v in base.items() if k != factor)]
    return sorted(out, key=lambda r: r["point"][factor])


def fit_growth(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per factor and stage: ``{a, b, r2, ratio}`` against M (linear), ``{k, r2}`` against the others
    (power law); also for the peak memory (``memory``). Factors with fewer than two points are left out."""
    fits: dict[str, dict[str, dict[str, float]]] = {}
    for factor in FACTORS:
        rows = _along(results, factor)
        if len(rows) < 2:
            continue
        xs = [float(r["point"][factor]) for r in rows]
        series = {s: [r["seconds"][s] for r in rows] for s in STAGES}
        series["memory"] = [max(r["peak_memory_mb"], 1e-3) for r in rows]
        fits[factor] = {}
        for name, ys in series.items():
            if factor == "teachers":
                a, b, r2 = _line(xs, ys)
                fits[factor][name] = {
                    "a": a,
                    "b": b,
                    "r2": r2,
                    "ratio": ys[-1] / ys[0],
                    "x0": xs[0],
                    "x1": xs[-1],
                }
            else:
                _, k, r2 = _line([math.log(x) for x in xs], [math.log(y) for y in ys])
                fits[factor][name] = {"k": k, "r2": r2, "ratio": ys[-1] / ys[0], "x0": xs[0], "x1": xs[-1]}
    return fits


# --- outputs ------------------------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    lines = [
        "# Cost growth",
        "",
        f"Measured {data['date'][:10]} on {m.get('cpu', '?')}, {data['threads']} thread(s), torch {m.get('torch', '?')}; "
        f"median of {data['rounds'] * data['steps_per_round']} single steps per stage after a warm-up, fast path, "
        f"all points timed in one process in interleaved rounds (load {_load(data)}); memory in one fresh process per point. Teachers: untrained LeNet-5s of {data['labels_per_teacher']} labels each "
        "(speed and memory do not depend on the weights). Regenerate with `dfka bench scaling`.",
        "",
        "| point | labels | teacher params | GAN ms | export ms (512 samples) | block ms | fine-tune ms | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["points"]:
        p, s = r["point"], r["seconds"]
        lines.append(
            f"| {Point(**p).label()} | {r['labels']} | {r['teacher_params'] / 1e3:.0f}k | "
            + " | ".join(f"{1e3 * s[k]:.1f}" for k in STAGES)
            + f" | {r['peak_memory_mb']:.0f} |"
        )
    lines += ["", "**Growth** (per stage; memory is the process's peak above its imports):", ""]
    lines += ["| factor | GAN | export | block | fine-tune | memory |", "|---|---|---|---|---|---|"]
    for factor, per in data["fits"].items():
        cells = [_fit_text(factor, per[name], memory=name == "memory") for name in (*STAGES, "memory")]
        lines.append(f"| {TITLES[factor]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Against M: the slope `b` in ms (or MB) per added teacher, R², and the ratio at "
        "the largest M to the smallest. Against widths and the batch: the exponent k of t ∝ x^k, R², and the ratio "
        "across the range.",
        "",
    ]
    return "\n".join(lines)


def _load(data: dict[str, Any]) -> str:
    loads = [v[0] for v in data.get("load", []) if v]
    return "–".join(f"{v:.1f}" for v in loads) if loads else "n/a"


def _fit_text(factor: str, f: dict[str, float], memory: bool = False) -> str:
    if factor == "teachers":
        slope = f"+{f['b']:.0f} MB" if memory else f"+{1e3 * f['b']:.1f} ms"
        return f"{slope}/teacher (R² {f['r2']:.2f}; ×{f['ratio']:.1f})"
    return f"k = {f['k']:.2f} (R² {f['r2']:.2f}; ×{f['ratio']:.1f})"


def plot(data: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = [f for f in FACTORS if f in data["fits"]]
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        rows = _along(data["points"], factor)
        xs = [r["point"][factor] for r in rows]
        for stage in STAGES:
            ax.plot(xs, [1e3 * r["seconds"][stage] for r in rows], marker="o", label=stage)
        ax.set_xlabel(TITLES[factor])
        ax.set_ylabel("ms per step (median)")
        if factor != "teachers":
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        mem = ax.twinx()
        mem.plot(xs, [r["peak_memory_mb"] for r in rows], color="0.5", ls="--", marker="x", label="peak MB")
        mem.set_ylabel("peak memory (MB)", color="0.4")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"cost growth, {data['threads']} thread(s), {data['machine'].get('cpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(data: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    from dfka.bench.results import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "scaling.json", "markdown": out / "scaling.md", "plot": out / "scaling.png"}
    atomic_write(paths["json"], json.dumps(data, indent=1) + "\n")
    atomic_write(paths["markdown"], markdown(data))
    plot(data, paths["plot"])
    return paths


def _main(argv: Sequence[str]) -> int:
    """``python -m dfka.bench.scaling POINT_JSON``: one point's memory, as a JSON line on stdout."""
    print(json.dumps(memory_of(Point(**json.loads(argv[0])))))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
