"""Shared test settings: single-threaded torch, deterministic seeds, a private DFKA_HOME per session."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- real SeaweedFS + MLflow (dfka.ops.stack)

#: Endpoint settings a developer may have exported; tests must neither use them nor treat them as "external".
STACK_ENV_KEYS = (
    "DFKA_S3_ENDPOINT",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_URI",
    "DFKA_BUCKET",
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """One real stack per session, on free ports in a private home (never the user's 8333/5000 stack)."""
    from dfka.ops.stack import StackPorts, stack_down, stack_up

    home = tmp_path_factory.mktemp("dfka-stack")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in STACK_ENV_KEYS:
                mp.delenv(key, raising=False)
            info = stack_up(home, StackPorts.free())
        yield info
    finally:
        stack_down(home)


@pytest.fixture
def stack_env(stack, monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Point dfka at the session stack for one test; DFKA_HOME is a fresh per-test directory."""
    for key in STACK_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in stack.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DFKA_HOME", str(tmp_path / "dfka-home"))
    return stack
