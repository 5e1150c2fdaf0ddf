"""Run, compile and submit the KFP pipeline from ``dfka`` without importing kfp.

``dfka`` is the library and never imports kfp; the pipeline lives in the repository's ``pipelines/``
package (pipelines -> components -> dfka). These helpers find that package and run its modules in a
subprocess of the same interpreter: ``python -m pipelines.run_local|compile|submit``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dfka
from dfka.errors import ConfigError, DfkaError
from dfka.settings import PARENT_PID_ENV

PIPELINE_FILE = Path("pipelines") / "dfka_pipeline.py"


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``pipelines/``: the current directory or a parent, else dfka's source tree."""
    here = Path(start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        if (folder / PIPELINE_FILE).is_file():
            return folder
    source_tree = Path(dfka.__file__).absolute().parents[2]  # <repo>/src/dfka/__init__.py (editable install)
    if (source_tree / PIPELINE_FILE).is_file():
        return source_tree
    raise ConfigError(
        f"cannot find {PIPELINE_FILE} in {here} or its parents (nor next to dfka's source)",
        "run this from a checkout of the dfka repository (the pipeline, components and configs live there)",
    )


def run_module(module: str, args: Sequence[str], *, root: Path | None = None) -> int:
    """``python -m pipelines.<module> args…`` in the project root; returns the exit code."""
    root = root or project_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    env[PARENT_PID_ENV] = str(os.getpid())  # the runner stops when this command is killed
    return subprocess.run([sys.executable, "-m", f"pipelines.{module}", *args], cwd=root, env=env).returncode


def run_local(
    config_path: str | os.PathLike[str],
    *,
    local_root: str | None = None,
    verbose: bool = False,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline locally (kfp.local, local stack); return the summary the run printed:
    ``run_id``, ``seconds``, ``stages`` (wall-clock per stage), ``metrics``, ``results``, ``markdown``,
    ``mlflow`` (parent run link), ``bucket`` and ``registered_model``. ``run_id`` reruns an earlier run:
    a training stage that was cut off resumes from its last checkpoint."""
    config = Path(config_path).absolute()
    if not config.is_file():
        raise ConfigError(
            f"config file {config_path} not found", "check the path (configs/ holds the examples)"
        )
    with tempfile.TemporaryDirectory(prefix="dfka-run-") as tmp:
        out = Path(tmp) / "summary.json"
        args = ["--config", str(config), "--results-json", str(out)]
        if local_root:
            args += ["--local-root", str(Path(local_root).absolute())]
        if verbose:
            args.append("--verbose")
        if run_id:
            args += ["--run-id", run_id]
        code = run_module("run_local", args)
        if code != 0 or not out.is_file():
            raise DfkaError(f"the local pipeline run failed (exit code {code})", "see the stage logs above")
        return json.loads(out.read_text())
