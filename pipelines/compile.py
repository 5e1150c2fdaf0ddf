"""Compile the pipeline to YAML: ``python -m pipelines.compile [--config FILE] [--out FILE]``.

Without ``--config`` this writes the committed ``pipelines/dfka_pipeline.yaml`` (default settings and
parameters); ``tests/test_pipeline_yaml.py`` fails when that file drifts from the code. With
``--config`` the experiment's ``pipeline:`` section (placement, images, retries, root) is compiled in and
its values become the parameter defaults.
"""

import argparse
import sys
from pathlib import Path

from kfp import compiler

from dfka.pipeline_config import ExperimentConfig
from pipelines.dfka_pipeline import build

DEFAULT_OUT = Path(__file__).with_name("dfka_pipeline.yaml")


def compile_pipeline(out: Path = DEFAULT_OUT, config: ExperimentConfig | None = None) -> Path:
    pipeline = build(config.pipeline if config else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        pipeline, str(out), pipeline_parameters=config.pipeline_arguments() if config else None
    )
    return out


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="experiment config (configs/*.yaml); default: built-in defaults")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output YAML (default: %(default)s)")
    args = parser.parse_args(argv)
    config = ExperimentConfig.load(args.config) if args.config else None
    out = compile_pipeline(Path(args.out), config)
    print(f"compiled {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
