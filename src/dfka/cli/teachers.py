"""``dfka teachers``: train teachers on label subsets, build a cached teacher set, inspect bundles."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("teachers", help="train, build and inspect teacher bundles")
    cmds = group.add_subparsers(dest="teachers_command", required=True, metavar="SUBCOMMAND")

    train = cmds.add_parser("train", help="train one teacher on a label subset and save its bundle")
    train.add_argument(
        "--dataset",
        required=True,
        help="mnist, fashion, mnist+fashion, mosaic, or a folder dataset (ROOT/train/LABEL/IMAGE.png, "
        "ROOT/test/...; `dfka data rgb` makes one)",
    )
    train.add_argument("--labels", required=True, help="label names, ranges allowed: digit_0..digit_4")
    train.add_argument("--task", default="multiclass", choices=["multiclass", "multilabel"])
    train.add_argument("--arch", default="lenet5", help="architecture spec, e.g. lenet5, lenet5:2, resnet:1")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--name", help="teacher name (default: derived from dataset and labels)")
    train.add_argument("--out", required=True, help="bundle directory or s3://bucket/prefix")
    train.add_argument("--experiment", default="dfka-teachers", help="MLflow experiment")
    train.add_argument("--threads", type=int)
    train.set_defaults(func=_train)

    zoo = cmds.add_parser(
        "zoo", help="build every teacher of a config (cached: unchanged recipes are skipped)"
    )
    zoo.add_argument("config", help="e.g. configs/demo-teachers.yaml")
    zoo.add_argument("--force", action="store_true", help="retrain even if a matching bundle exists")
    zoo.add_argument("--threads", type=int)
    zoo.set_defaults(func=_zoo)

    pack = cmds.add_parser(
        "pack",
        help="bundle a teacher you trained elsewhere: factory + state dict + label names -> safetensors + teacher.json",
    )
    pack.add_argument(
        "--arch",
        required=True,
        help="architecture: a built-in (resnet18:0.25:blocks=3), an installed dfka.architectures entry "
        "point, or module:factory with the module listed in DFKA_ARCH_MODULES",
    )
    pack.add_argument(
        "--weights", required=True, help="state dict: .safetensors (or .pt/.pth with --trust-pickle)"
    )
    pack.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read a .pt/.pth state dict you made yourself (torch.load(weights_only=True))",
    )
    pack.add_argument(
        "--labels", required=True, help="the output labels in order, comma-separated: cat,dog,fox"
    )
    pack.add_argument("--input-shape", required=True, help="C,H,W of the inputs, e.g. 3,32,32")
    pack.add_argument("--mean", default="0", help="per-channel normalisation mean, e.g. 0.49,0.48,0.45")
    pack.add_argument("--std", default="1", help="per-channel normalisation std, e.g. 0.25,0.24,0.26")
    pack.add_argument("--task", default="multiclass", choices=["multiclass", "multilabel"])
    pack.add_argument("--name", required=True, help="teacher name (letters, digits, '_' and '-')")
    pack.add_argument("--out", required=True, help="bundle directory or s3://bucket/prefix")
    pack.set_defaults(func=_pack)

    show = cmds.add_parser("show", help="verify a bundle and print its manifest")
    show.add_argument("uri", help="bundle directory or s3://bucket/prefix")
    show.set_defaults(func=_show)


def train_tracked(recipe, out: str, experiment: str, threads: int | None) -> dict:
    """Train one teacher with an MLflow run (offline fallback), return its manifest as a dict."""
    from dfka.teachers import train_teacher
    from dfka.tracking import Tracker

    with Tracker.start(experiment, recipe.name or "teacher", tags={"dfka.kind": "teacher"}) as tracker:
        tracker.log_params(asdict(recipe) | {"labels": list(recipe.labels), "out": out})
        manifest = train_teacher(recipe, out, threads=threads, on_metrics=tracker)
        tracker.log_dict(json.loads(manifest.model_dump_json()), "teacher.json")
        tracker.set_tags({"dfka.bundle": out})
    return json.loads(manifest.model_dump_json())


def _train(args: argparse.Namespace) -> int:
    from dfka.data import parse_labels
    from dfka.data.labels import check_dataset, is_folder_dataset
    from dfka.models import parse_arch
    from dfka.teachers import TeacherRecipe

    folder = check_dataset(args.dataset) if is_folder_dataset(args.dataset) else None
    recipe = TeacherRecipe(
        dataset=args.dataset,
        labels=parse_labels(args.labels, folder),
        task=args.task,
        arch=parse_arch(args.arch),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        name=args.name,
    )
    manifest = train_tracked(recipe, args.out, args.experiment, args.threads)
    _print_row(manifest, args.out, cached=False)
    return 0


def _zoo(args: argparse.Namespace) -> int:
    from dfka import storage
    from dfka.teachers import ZooConfig, cached_manifest, recipe_for

    cfg = ZooConfig.load(args.config)
    for teacher in cfg.teachers:
        recipe = recipe_for(teacher)
        out = storage.join(cfg.out, teacher.name)
        manifest = None if args.force else cached_manifest(out, recipe)
        if manifest is not None:
            _print_row(json.loads(manifest.model_dump_json()), out, cached=True)
            continue
        _print_row(train_tracked(recipe, out, cfg.experiment, args.threads), out, cached=False)
    return 0


def _numbers(text: str, what: str, kind=float) -> list:
    from dfka.errors import ConfigError

    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{what} {text!r} is not a comma-separated list of numbers", "e.g. 3,32,32"
        ) from None


def _pack(args: argparse.Namespace) -> int:
    from dfka.bundles import pack_bundle, read_state_dict
    from dfka.errors import ConfigError
    from dfka.models import parse_arch

    labels = [v.strip() for v in args.labels.split(",") if v.strip()]
    shape = _numbers(args.input_shape, "--input-shape", int)
    if len(shape) != 3:
        raise ConfigError(f"--input-shape {args.input_shape!r} is not C,H,W", "e.g. --input-shape 3,32,32")
    mean, std = _numbers(args.mean, "--mean"), _numbers(args.std, "--std")
    spec = parse_arch(args.arch) | {"input_shape": shape, "num_outputs": len(labels)}
    state = read_state_dict(args.weights, trust_pickle=args.trust_pickle)
    bundle = pack_bundle(
        spec, state, args.out, name=args.name, labels=labels, task=args.task, mean=mean, std=std
    )
    m = bundle.manifest
    print(
        f"packed {m.name}: {m.arch['arch']}, {m.block_count} blocks, levels {m.level_shapes}, "
        f"{len(m.labels)} labels ({m.labels[0]}..{m.labels[-1]}) -> {args.out} (verified)"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    from dfka.bundles import load_bundle

    bundle = load_bundle(args.uri)
    print(bundle.manifest.model_dump_json(indent=2))
    print(
        f"verified: sha256 and {len(bundle.model.state_dict())} tensors match {bundle.manifest.arch['arch']}"
    )
    return 0


def _print_row(manifest: dict, out: str, cached: bool) -> None:
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in manifest["metrics"].items() if k.startswith("test_"))
    labels = manifest["labels"]
    span = f"{labels[0]}..{labels[-1]}" if len(labels) > 2 else ",".join(labels)
    print(f"{manifest['name']:<16} {span:<24} {metrics:<28} {'(cached) ' if cached else ''}{out}")
