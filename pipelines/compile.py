"""Compile the pipeline to YAML: ``python -m pipelines.compile [--config FILE] [--out FILE]``.

Without ``--out`` this writes both committed pipelines, ``pipelines/dfka_pipeline.yaml`` and the sweep's
``pipelines/dfka_sweep.yaml``; ``tests/test_pipeline_yaml.py`` fails when either drifts from the code.
``--out`` writes one (``--sweep``: the sweep). With ``--config`` the experiment's ``pipeline:`` section
(placement, images, retries, root) and ``sweep.parallelism`` are compiled in and its values become the
parameter defaults.
"""

import argparse
import sys
from pathlib import Path

from kfp import compiler

from dfka.pipeline_config import ExperimentConfig
from pipelines.dfka_pipeline import build
from pipelines.dfka_sweep import build_sweep

DEFAULT_OUT = Path(__file__).with_name("dfka_pipeline.yaml")
SWEEP_OUT = Path(__file__).with_name("dfka_sweep.yaml")


def compile_pipeline(out: Path = DEFAULT_OUT, config: ExperimentConfig | None = None) -> Path:
    pipeline = build(config.pipeline if config else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        pipeline, str(out), pipeline_parameters=config.pipeline_arguments() if config else None
    )
    return out


def compile_sweep(out: Path = SWEEP_OUT, config: ExperimentConfig | None = None) -> Path:
    pipeline = build_sweep(config.pipeline if config else None, config.sweep if config else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        pipeline, str(out), pipeline_parameters=config.sweep_arguments() if config else None
    )
    return out


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment config (configs/*.yaml); default: built-in defaults")
    parser.add_argument("--out", help=f"output YAML (default: {DEFAULT_OUT.name} and {SWEEP_OUT.name} here)")
    parser.add_argument("--sweep", action="store_true", help="with --out: compile the sweep pipeline")
    args = parser.parse_args(argv)
    config = ExperimentConfig.load(args.config) if args.config else None
    if args.out:
        outs = [(compile_sweep if args.sweep else compile_pipeline)(Path(args.out), config)]
    else:
        outs = [compile_pipeline(DEFAULT_OUT, config), compile_sweep(SWEEP_OUT, config)]
    for out in outs:
        print(f"compiled {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
