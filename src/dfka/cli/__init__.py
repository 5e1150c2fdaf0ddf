"""The ``dfka`` command line. Each module in this package adds one command group via ``register``."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import pkgutil
import sys

from dfka import __version__
from dfka.errors import DfkaError
from dfka.settings import load_stack_env, redact


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfka", description="Data-free knowledge amalgamation.")
    parser.add_argument("--version", action="version", version=f"dfka {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for commands that re-run themselves (--nproc)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        load_stack_env()
        return int(args.func(args) or 0)
    except DfkaError as err:
        print(redact(f"error: {err}"), file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: {err.strerror}{where}", file=sys.stderr)
        print(
            "  fix: free space there (or point DFKA_HOME / --out at another disk) and run the same command "
            "again: finished checkpoints and results are kept",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
