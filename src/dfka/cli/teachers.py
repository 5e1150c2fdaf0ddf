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
    train.add_argument("--dataset", required=True, help="mnist, fashion, mnist+fashion or mosaic")
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
    from dfka.models import parse_arch
    from dfka.teachers import TeacherRecipe

    recipe = TeacherRecipe(
        dataset=args.dataset,
        labels=parse_labels(args.labels),
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
