"""``dfka bench``: run the benchmarks (dfka against its baselines), regenerate their reports, list them."""

from __future__ import annotations

import argparse
import math

DEFAULT_OUT = "benchmarks/results"


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("bench", help="run benchmarks of dfka against its baselines, and report them")
    cmds = group.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")

    run = cmds.add_parser(
        "run",
        help="run one benchmark (seeds × methods) and write CSV, JSON, markdown, plots",
        description="Train (or reuse) the benchmark's teachers, then every (method, seed), and write "
        "OUT/NAME.csv, .json, .md, NAME-accuracy-vs-time.png and NAME-samples-METHOD.png. Re-runs replace "
        "their (method, seed) rows; other rows stay.",
    )
    run.add_argument("name", help="benchmark name (benchmarks/NAME.yaml) or a YAML path")
    run.add_argument("--seeds", help="comma-separated seeds (default: the YAML's, usually 0,1,2)")
    run.add_argument(
        "--methods", help="comma-separated subset of: ensemble,dfka,dafl,dfad,noise,kd-real,layerwise"
    )
    run.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    run.add_argument("--budget-minutes", type=float, help="wall-clock per data-free (method, seed)")
    run.add_argument("--reference-budget-minutes", type=float, help="wall-clock for kd-real and layerwise")
    run.add_argument("--jobs", type=int, default=1, help="parallel worker processes, 1 torch thread each")
    run.add_argument("--threads", type=int, help="torch threads per job (default: the YAML's, else 1)")
    run.add_argument(
        "--eval-split",
        choices=("test", "dev"),
        help="score final models on the test split (default) or on a fixed dev subset of the training "
        "split, for tuning without touching the test split (use another --out)",
    )
    run.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    run.add_argument("--experiment", default="dfka-bench", help="MLflow experiment (default dfka-bench)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=_run)

    report = cmds.add_parser(
        "report",
        help="regenerate tables, plots and the summary from the result files",
        description="Rebuild every NAME.md/.csv/plot/grid in OUT from NAME.json, and OUT/README.md.",
    )
    report.add_argument("--out", default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    report.add_argument(
        "--update-readme",
        action="store_true",
        help="also replace the block between <!-- bench:start --> and <!-- bench:end --> in the README",
    )
    report.add_argument("--readme", default="README.md", help="README to update (default ./README.md)")
    report.add_argument(
        "--allow-dirty",
        action="store_true",
        help="publish rows that ran on uncommitted code (or an unknown commit); they are marked as such",
    )
    report.set_defaults(func=_report)

    ls = cmds.add_parser("list", help="the available benchmarks, their budgets and result status")
    ls.add_argument("--out", default=DEFAULT_OUT, help="results directory to report status from")
    ls.add_argument("--jobs", type=int, default=2, help="parallel jobs assumed by the time estimate")
    ls.set_defaults(func=_list)

    tp = cmds.add_parser(
        "throughput",
        help="samples/s per training step and the fraction of the float32 matmul peak, fast vs reference path",
        description="Time one step of every stage (GAN, export, each block, fine-tune) on the fast and the "
        "reference compute path, interleaved, and report median ms/step, samples/s, GFLOP/s and the "
        "fraction of the machine's float32 matmul peak (one large torch.matmul). Without --teachers it "
        "uses untrained LeNet-5 teachers of --arch (speed does not depend on the weights).",
    )
    tp.add_argument("--teachers", nargs="*", default=None, help="teacher bundles (folders or s3:// URIs)")
    tp.add_argument("--arch", default="lenet5:2", help="synthetic teachers' architecture (default lenet5:2)")
    tp.add_argument("--student", default="lenet5:1.0", help="student architecture (default lenet5:1.0)")
    tp.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    tp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    tp.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    tp.add_argument("--steps-per-round", type=int, default=6, help="timed steps per round (default 6)")
    tp.add_argument("--json", dest="json_out", help="also write the report as JSON here")
    tp.set_defaults(func=_throughput)

    sc = cmds.add_parser(
        "scaling",
        help="how step time and memory grow with the number of teachers, their width, the student and the batch",
        description="Time one step of every training stage (GAN, export, a block, fine-tune) and measure the "
        "peak memory, one factor at a time around 2 LeNet-5 teachers / a LeNet-5 student / batch 64 (every "
        "point timed in one process in interleaved rounds, its memory in a fresh process); fit the growth (linear in the number of teachers, a power law in widths "
        "and batch) and write OUT/scaling.json, .md and .png.",
    )
    sc.add_argument("--out", default=DEFAULT_OUT, help="results directory (default benchmarks/results)")
    sc.add_argument(
        "--factors", default=None, help="comma-separated subset of teachers,teacher_width,student_width,batch"
    )
    sc.add_argument("--teachers", default=None, help="teacher counts to measure (default 2,3,5,8)")
    sc.add_argument("--threads", type=int, default=1, help="torch threads per point (default 1)")
    sc.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    sc.add_argument("--steps-per-round", type=int, default=4, help="timed steps per round (default 4)")
    sc.set_defaults(func=_scaling)


def _run(args: argparse.Namespace) -> int:
    from dfka.bench.runner import failure_summary, parse_list, run_benchmark

    result = run_benchmark(
        args.name,
        seeds=parse_list(args.seeds, int),
        methods=parse_list(args.methods),
        out_dir=args.out,
        budget_minutes=args.budget_minutes,
        reference_budget_minutes=args.reference_budget_minutes,
        jobs=args.jobs,
        threads=args.threads,
        eval_split=args.eval_split,
        mlflow=not args.no_mlflow,
        experiment=args.experiment,
        progress=not args.no_progress,
    )
    print(f"\n{result.outputs['markdown'].read_text()}")
    print(f"written: {result.outputs['csv']}, {result.outputs['markdown']}, {result.outputs['plot']}")
    error = failure_summary(result)
    if error is not None:
        raise error
    return 0


def _report(args: argparse.Namespace) -> int:
    from dfka.bench.report import write_report

    written = write_report(
        args.out, readme=args.readme if args.update_readme else None, allow_dirty=args.allow_dirty
    )
    for name, outputs in written.items():
        if isinstance(outputs, dict):
            print(
                f"{name}: {outputs['markdown']}, {outputs['csv']}, {outputs['plot']}, {len(outputs['grids'])} grid(s)"
            )
    print(f"summary: {written['summary']}")
    if "readme" in written:
        print(f"updated: {written['readme']}")
    return 0


def _throughput(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from dfka.amalgamation.config import AmalgamationConfig
    from dfka.bench import throughput
    from dfka.bundles import load_bundle

    bundles = (
        [load_bundle(t) for t in args.teachers] if args.teachers else throughput.synthetic_teachers(args.arch)
    )
    labels = [label for b in bundles for label in b.manifest.labels]
    cfg = AmalgamationConfig(student=args.student, target_labels=list(dict.fromkeys(labels)))
    report = throughput.measure(
        bundles,
        cfg,
        threads=args.threads,
        device=args.device,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        progress=lambda msg: print(msg, flush=True),
    )
    print(report.table())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.as_dict(), indent=1))
        print(f"written: {args.json_out}")
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from dfka.bench import scaling
    from dfka.bench.runner import parse_list

    factors = parse_list(args.factors) or list(scaling.FACTORS)
    values = {"teachers": parse_list(args.teachers, int)} if args.teachers else None
    points = scaling.grid(factors, values)
    data = scaling.run_scaling(
        points,
        threads=args.threads,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        progress=lambda msg: print(msg, flush=True),
    )
    paths = scaling.write_outputs(data, args.out)
    print(paths["markdown"].read_text())
    print(f"written: {paths['json']}, {paths['markdown']}, {paths['plot']} ({data['seconds_wall']:.0f} s)")
    return 0


def estimate_minutes(cfg, jobs: int) -> float:
    """Rough wall-clock of a full run: jobs of equal budget packed onto ``jobs`` workers, plus overheads."""
    from dfka.bench.config import DATA_FREE, WITH_DATA

    per_seed = [cfg.budget_minutes for m in cfg.methods if m in DATA_FREE]
    per_seed += [cfg.reference_minutes for m in cfg.methods if m in WITH_DATA]
    durations = sorted((d + 0.3 for d in per_seed * len(cfg.seeds)), reverse=True)  # + load/eval/start-up
    workers = [0.0] * max(1, jobs)
    for d in durations:
        workers[workers.index(min(workers))] += d
    return max(workers)


def _list(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dfka.bench.config import available_benchmarks, benchmarks_dir, load_benchmark
    from dfka.bench.results import json_path, load_results
    from dfka.errors import DfkaError

    paths = available_benchmarks()
    if not paths:
        print(f"no benchmarks in {benchmarks_dir()}")
        return 0
    print(
        f"{'name':<16} {'dataset':<14} {'teachers':>8} {'|Y_cst|':>7} {'budget':>8} {'seeds':<8} {'est.':>7}  results"
    )
    for path in paths:
        try:
            cfg = load_benchmark(path)
        except DfkaError as err:
            print(f"{path.stem:<16} invalid: {err.problem}")
            continue
        data = load_results(json_path(Path(args.out), cfg.name))
        done = f"{sum(r['status'] == 'ok' for r in data['runs'].values())} runs" if data else "none"
        est = estimate_minutes(cfg, args.jobs)
        seeds = ",".join(map(str, cfg.seeds))
        print(
            f"{cfg.name:<16} {cfg.dataset:<14} {len(cfg.teachers):>8} {len(cfg.label_set()):>7} "
            f"{cfg.budget_minutes:>6g}m {seeds:<8} {math.ceil(est):>5}m  {done}"
        )
        print(f"{'':<16} {cfg.description}  [methods: {', '.join(cfg.methods)}]")
    print(
        f"\nest.: wall-clock of a full run with --jobs {args.jobs} (training budgets + ~20 s per job), teachers excluded"
    )
    return 0
