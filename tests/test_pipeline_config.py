"""The experiment config (configs/*.yaml): validation, pipeline parameters, label resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfka.amalgamation.config import AmalgamationConfig
from dfka.data.labels import resolve_target_labels
from dfka.errors import ConfigError, LabelError
from dfka.ops.placement import DEFAULT_GPU_PLACEMENT
from dfka.pipeline_config import (
    DEMO_TEACHERS,
    ExperimentConfig,
    config_hash,
    method_parameters,
    resolve_method_config,
)
from dfka.settings import MLFLOW_EXTERNAL_URL_ENV, mlflow_browser_url

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo-teachers.yaml")


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_committed_configs_validate(path: Path) -> None:
    cfg = ExperimentConfig.load(path)
    args = cfg.pipeline_arguments()
    assert set(args) == {
        "teachers",
        "target_labels",
        "amalgamation",
        "seed",
        "samples",
        "evaluation_dataset",
        "experiment",
        "mlflow_tracking_uri",
        "bucket",
    }
    # the amalgamation parameter re-validates to the same method config
    again = resolve_method_config(
        args["amalgamation"],
        target_labels=cfg.amalgamation.target_labels,
        seed=args["seed"],
        samples=args["samples"],
    )
    assert again == cfg.amalgamation


def test_demo_config_is_the_demo() -> None:
    cfg = ExperimentConfig.load(ROOT / "configs" / "demo.yaml")
    assert tuple(cfg.teachers) == DEMO_TEACHERS
    assert cfg.evaluation.dataset == "mnist"
    method = cfg.amalgamation  # step budgets: two demo runs give the same numbers
    assert method.budget_minutes is None and method.gan.budget.steps and method.regroup.finetune.steps
    assert method.blocks.budget.steps == 1 and method.gan.loss.consistency == 0.0  # the 40/0/60 split
    assert cfg.pipeline.gpu == DEFAULT_GPU_PLACEMENT


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"teachers": ["a", "b"], "experimnt": "x"}, "experimnt"),
        ({"teachers": ["a", "b"], "amalgamation": {"gan": {"lr": 1e-3, "lrr": 1}}}, "amalgamation.gan.lrr"),
        ({"teachers": ["a", "b"], "pipeline": {"gpu": {"node_selecter": {}}}}, "pipeline.gpu.node_selecter"),
        ({"teachers": ["a", "b"], "pipeline": {"pipeline_root": "/tmp/x"}}, "pipeline.pipeline_root"),
        ({"teachers": ["a"]}, "teachers"),
        (
            {
                "teachers": ["a", "b"],
                "target_labels": "digit_1",
                "amalgamation": {"target_labels": ["digit_2"]},
            },
            "twice",
        ),
    ],
)
def test_invalid_configs_are_rejected(raw: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        ExperimentConfig.parse(raw)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        ExperimentConfig.load("configs/nope.yaml")


def test_explicit_parameters_override_the_mapping() -> None:
    cfg = resolve_method_config(
        {"seed": 1, "export": {"samples": 10}}, target_labels=None, seed=5.0, samples=77.0
    )
    assert cfg.seed == 5 and cfg.export.samples == 77  # KFP hands ints over as floats
    with pytest.raises(ConfigError, match=r"export\.sampels"):
        resolve_method_config({"export": {"sampels": 1}}, target_labels=None)
    assert method_parameters(AmalgamationConfig()) == {}


def test_target_labels_by_name_and_range() -> None:
    available = [f"digit_{i}" for i in range(10)]
    assert resolve_target_labels("", available) is None
    assert resolve_target_labels(None, available) is None
    assert resolve_target_labels("Digit_3, digit_1", available) == ["digit_3", "digit_1"]
    assert resolve_target_labels(["digit_0..digit_2", "digit_9"], available) == [
        "digit_0",
        "digit_1",
        "digit_2",
        "digit_9",
    ]
    with pytest.raises(LabelError, match="not a label of any teacher"):
        resolve_target_labels("digit_3,cat", available)


def test_config_hash_is_order_independent() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_no_pipeline_root_unless_a_config_sets_one() -> None:
    """No root by default (the namespace's kfp-launcher decides); an empty one means the same."""
    assert ExperimentConfig.parse({"teachers": ["a", "b"]}).pipeline.pipeline_root is None
    empty = ExperimentConfig.parse({"teachers": ["a", "b"], "pipeline": {"pipeline_root": ""}})
    assert empty.pipeline.pipeline_root is None
    chosen = ExperimentConfig.parse({"teachers": ["a", "b"], "pipeline": {"pipeline_root": "minio://x/y"}})
    assert chosen.pipeline.pipeline_root == "minio://x/y"


def test_mlflow_browser_url() -> None:
    in_cluster = "http://mlflow.kubeflow.svc.cluster.local:5000"
    assert mlflow_browser_url(in_cluster, {}) == in_cluster
    assert mlflow_browser_url(in_cluster, {MLFLOW_EXTERNAL_URL_ENV: "  "}) == in_cluster
    external = {MLFLOW_EXTERNAL_URL_ENV: "https://mlflow.example.com/"}
    assert mlflow_browser_url(in_cluster, external) == "https://mlflow.example.com"
    proxied = {MLFLOW_EXTERNAL_URL_ENV: "https://kubeflow.example.com/mlflow"}  # behind a path prefix
    assert mlflow_browser_url(in_cluster, proxied) == "https://kubeflow.example.com/mlflow"
    for bad in ("mlflow.example.com", "ftp://mlflow.example.com", "https://x.example.com/?a=1"):
        with pytest.raises(ConfigError, match=MLFLOW_EXTERNAL_URL_ENV) as err:
            mlflow_browser_url(in_cluster, {MLFLOW_EXTERNAL_URL_ENV: bad})
        assert "http://localhost:5000" in str(err.value)  # the message says how to fix it


def test_mlflow_browser_url_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MLFLOW_EXTERNAL_URL_ENV, "http://localhost:5000")
    assert mlflow_browser_url("http://mlflow.dfka.svc.cluster.local:5000") == "http://localhost:5000"
    monkeypatch.delenv(MLFLOW_EXTERNAL_URL_ENV)
    assert mlflow_browser_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
