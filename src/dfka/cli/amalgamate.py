"""``dfka amalgamate``: stages 1-3 in one process, then an evaluation on the real test split."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "amalgamate",
        help="amalgamate teacher bundles into one TargetNet without training data (stages 1-3), then evaluate",
    )
    p.add_argument(
        "--teachers", nargs="+", required=True, help="teacher bundle dirs or s3:// prefixes (>= 2)"
    )
    p.add_argument("--labels", help="target labels Y_cst by name, ranges allowed (default: the union)")
    p.add_argument(
        "--student", default=None, help="student architecture, e.g. lenet5:0.5 (default from config)"
    )
    p.add_argument(
        "--budget-minutes", type=float, help="wall-clock budget for stages 1-3, split over the stages"
    )
    p.add_argument("--config", help="YAML with AmalgamationConfig fields (command-line flags win)")
    p.add_argument("--preset", choices=["dfka", "paper"], help="paper: the paper's losses only (ablation)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--eval-dataset",
        help="real test split to score on (default: the teachers' dataset), or your own labelled test "
        "set: a folder or s3:// prefix with one sub-folder of PNG/JPEG images per label name",
    )
    p.add_argument("--out", required=True, help="output dir or s3://bucket/prefix for the TargetNet")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes for stages 1-3 (torchrun, gloo on CPU, one GPU each on CUDA): each "
        "rank trains on its share of every batch; the batch sizes must be multiples of it (default 1)",
    )
    p.set_defaults(func=_amalgamate)


def _amalgamate(args: argparse.Namespace) -> int:
    from dfka.amalgamation.config import AmalgamationConfig
    from dfka.amalgamation.regroup import save_targetnet
    from dfka.amalgamation.run import amalgamate, check_ranks
    from dfka.bundles import load_bundle
    from dfka.config_files import load_yaml
    from dfka.data.folder import is_folder_spec, open_folder
    from dfka.data.labels import resolve_target_labels
    from dfka.engine import distributed as dist
    from dfka.errors import ConfigError, describe_validation
    from dfka.runtime import ensure_writable_dir

    raw = load_yaml(args.config) if args.config else {}
    for key, value in {
        "student": args.student,
        "budget_minutes": args.budget_minutes,
        "preset": args.preset,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
    }.items():
        if value is not None:
            raw[key] = value
    try:
        cfg = AmalgamationConfig.model_validate(raw)
    except ValueError as err:
        raise ConfigError(
            f"invalid amalgamation config: {describe_validation(err)}",
            "fix the keys named above (schema and defaults: dfka.amalgamation.config, README's config table)",
        ) from None
    bundles = [load_bundle(uri) for uri in args.teachers]
    if args.labels:  # names and ranges over the teachers' own labels (built-in or the user's)
        union = [label for b in bundles for label in b.labels]
        cfg = cfg.model_copy(update={"target_labels": resolve_target_labels(args.labels, union)})
    # what would fail after the training fails now: an unwritable --out, an unknown evaluation dataset
    if "://" not in args.out:
        ensure_writable_dir(args.out, OUT_BYTES)
    dataset = eval_dataset(bundles, args.eval_dataset)
    folder = None
    if is_folder_spec(dataset):  # checked whole (labels, sizes, every file) before anything trains
        union = cfg.target_labels or list(dict.fromkeys(y for b in bundles for y in b.labels))
        tasks = {b.task for b in bundles}
        folder = open_folder(
            dataset, union, bundles[0].model.input_shape, tasks.pop() if len(tasks) == 1 else "mixed"
        )
        print(f"test set: {dataset}: {len(folder)} images of {len(set(folder.targets))} labels")

    check_ranks(cfg, args.nproc)
    if args.nproc > 1:  # every check above passed: start the ranks, each runs this same command
        from dfka.engine.launch import run_ranks

        run_ranks(args.nproc, "dfka.cli", _without_nproc(args.argv), "dfka amalgamate")
        return 0
    result = amalgamate(bundles, cfg)
    if not dist.process().main:  # rank 0 reports, evaluates and writes the TargetNet
        dist.shutdown()
        return 0
    print("\nstage        seconds   steps   samples/s")
    for name, report in result.stages.items():
        print(f"{name:<12} {report.seconds:8.1f} {report.steps:7d} {report.samples_per_second:11.0f}")
    total = sum(r.seconds for r in result.stages.values())
    print(f"{'total':<12} {total:8.1f}")

    metrics = evaluate_on_test(result, bundles, dataset, folder)
    for key, value in metrics.items():
        print(f"{key:<32} {value:.4f}")
    provenance = {"teachers": [b.source for b in bundles], "config": json.loads(cfg.model_dump_json())}
    save_targetnet(result.targetnet.cpu(), args.out, metrics=metrics, provenance=provenance)
    print(f"TargetNet: {args.out}/ (targetnet.json, targetnet.safetensors, targetnet.torchscript.pt)")
    dist.shutdown()
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line a rank runs: the user's, minus ``--nproc N`` (torchrun set the ranks up)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


OUT_BYTES = 64 << 20  # a TargetNet (safetensors + TorchScript) is far smaller; a full disk is not


def eval_dataset(bundles, dataset: str | None) -> str:
    """The dataset the TargetNet is scored on: ``--eval-dataset`` or the one the teachers were trained on."""
    from dfka.errors import ConfigError

    if dataset is None:
        datasets = {b.manifest.training.get("dataset") for b in bundles}
        if len(datasets) != 1 or None in datasets:
            raise ConfigError(
                f"the teachers were trained on {sorted(map(str, datasets))}",
                "pass --eval-dataset (e.g. mnist+fashion, or a folder of your own labelled images)",
            )
        dataset = datasets.pop()
    return dataset


def evaluate_on_test(result, bundles, dataset: str | None, folder=None) -> dict[str, float]:
    """TargetNet, teacher ensemble and each teacher on the real test split, or on a user's folder test
    set (``folder``, from :func:`dfka.data.folder.open_folder`): union and sub-tasks, named as the
    ``evaluate`` stage names them (``test.student.acc``, ``test.teacher.<t>.acc``, ...)."""
    from dfka.bench.evaluate import load_eval_set
    from dfka.evaluation import evaluate_folder, evaluate_model, evaluate_teachers

    teachers, union = result.teachers.cpu(), result.union.cpu()
    if folder is not None:
        metrics = evaluate_folder(result.targetnet.cpu(), teachers, union, folder)
    else:
        dataset = eval_dataset(bundles, dataset)
        task = "multilabel" if teachers.task == "multilabel" else "multiclass"
        ev = load_eval_set(dataset, teachers, task)
        student, _ = evaluate_model(result.targetnet.cpu(), ev)
        ensemble, _ = evaluate_model(lambda x: union({n: m(x) for n, m in teachers}), ev)
        metrics = (
            {f"student.{k}": v for k, v in student.items()}
            | {f"ensemble.{k}": v for k, v in ensemble.items()}
            | evaluate_teachers(teachers, ev)
        )
    return {f"test.{k}": v for k, v in metrics.items()}
