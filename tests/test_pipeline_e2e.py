"""The whole pipeline through kfp.local on toy budgets, against a real SeaweedFS and MLflow.

``dfka pipeline run`` in a subprocess, like a user: six stage subprocesses, outputs published to the
bucket, one MLflow parent run with six children, a registered TargetNet that loads and predicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from dfka import storage
from dfka.amalgamation.regroup import load_targetnet
from dfka.amalgamation.samples import read_manifest
from dfka.data import load_split
from dfka.pipeline_config import STAGES
from dfka.stages.context import find_parent
from tests.test_secrets import assert_run_leaks_no_credentials
from tests.test_stages import tiny_mnist_teacher

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
DIGITS = [f"digit_{i}" for i in range(10)]


def test_pipeline_end_to_end_on_kfp_local(stack_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = stack_env.bucket
    teachers = [
        tiny_mnist_teacher(DIGITS[:5], f"s3://{bucket}/teachers/e2e/lo", "lo", seed=1),
        tiny_mnist_teacher(DIGITS[5:], f"s3://{bucket}/teachers/e2e/hi", "hi", seed=2),
    ]
    experiment = f"dfka-e2e-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "e2e.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": experiment,
                "teachers": teachers,
                "target_labels": "digit_0..digit_9",
                "evaluation": {"dataset": "mnist"},
                "amalgamation": {
                    "student": "lenet5:0.25",
                    "device": "cpu",
                    "gan": {"batch_size": 32, "budget": {"steps": 30}, "widths": 8},
                    "export": {"samples": 320, "shard_size": 128},
                    "blocks": {"batch_size": 32, "budget": {"steps": 15}},
                },
                "pipeline": {"local_root": str(tmp_path / "kfp"), "threads": 1},
            }
        )
    )
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # kfp.local leaves a temp folder per task
    monkeypatch.setenv("DFKA_MLFLOW_EXTERNAL_URL", "https://mlflow.example.org/")  # what a browser opens
    summary_file = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfka.cli",
            "pipeline",
            "run",
            "--config",
            str(config),
            "--results-json",
            str(summary_file),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads(summary_file.read_text())
    run_id = summary["run_id"]
    assert "| TargetNet (lenet5:0.25) |" in proc.stdout and summary["bucket"] in proc.stdout

    # every stage published its output under s3://<bucket>/runs/<run-id>/<stage>/
    runs = f"s3://{bucket}/runs/{run_id}"
    for stage in STAGES:
        assert "result.json" in storage.listdir(f"{runs}/{stage}"), stage
        assert summary["stages"][stage]["seconds"] > 0
    assert {"teacher_set.json", "teachers/lo/weights.safetensors"} <= set(
        storage.listdir(f"{runs}/ingest-teachers")
    )
    manifest = read_manifest(f"{runs}/export-synthetic-samples/samples")
    assert manifest.count == 320
    exported = set(storage.listdir(f"{runs}/export-synthetic-samples/samples"))
    assert {str(s["file"]) for s in manifest.shards} | {"samples.json"} == exported
    assert {"report.html", "results.md", "confusion.png", "samples_grid.png"} <= set(
        storage.listdir(f"{runs}/evaluate")
    )
    table = storage.get_bytes(f"{runs}/evaluate/results.md").decode()
    assert "- MLflow run: https://mlflow.example.org/#/experiments/" in table  # not the in-cluster URI

    # MLflow: one parent run, a child per stage, same param keys everywhere, metrics, artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack_env.mlflow_uri)
    parent_id = find_parent(client, experiment, run_id)
    assert parent_id is not None and summary["mlflow"]["parent_run_id"] == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    short = run_id.rsplit("-", 1)[-1]
    assert parent.info.run_name == f"{experiment} · dfka lenet5:0.25 step budgets · seed 0 · {short}"
    assert parent.data.tags["dfka.kfp_run_id"] == run_id
    assert parent.data.tags["dfka.git_commit"] and parent.data.tags["dfka.config_hash"]
    exp_id = parent.info.experiment_id
    children = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(STAGES)
    for child in children:
        assert child.info.status == "FINISHED", child.info.run_name
        assert set(child.data.params) == set(parent.data.params), child.info.run_name
        assert child.data.tags["dfka.config_hash"] == parent.data.tags["dfka.config_hash"]
        assert child.data.tags["dfka.outputs"] == f"{runs}/{child.info.run_name}"
        assert "stage.wall_seconds" in child.data.metrics
        for key in child.data.metrics:  # read back: every curve's steps increase, none starts at a fake 0
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert steps == sorted(set(steps)), (child.info.run_name, key, steps)
            assert len(steps) == 1 or steps[0] > 0, (child.info.run_name, key, steps)
    by_name = {c.info.run_name: c for c in children}
    gan = by_name["train-amalgamating-gan"]
    curve = next(k for k in gan.data.metrics if k.startswith("gan.") and "loss" in k)
    assert len(client.get_metric_history(gan.info.run_id, curve)) >= 2  # a loss curve, not one number
    assert "stage.samples_per_second" in gan.data.metrics
    metrics = parent.data.metrics
    for key in ("test.student.acc", "test.ensemble.acc", "test.teacher.lo.acc", "test.student.acc.digit_3"):
        assert key in metrics, key
    assert all(f"stage.{stage}.seconds" in metrics for stage in STAGES)
    assert metrics["stage.train-amalgamating-gan.steps"] == 30
    assert metrics["score.union"] == metrics["test.student.acc"]
    ratio = metrics["test.student.acc"] / metrics["test.ensemble.acc"]
    assert metrics["score.ratio_to_ensemble"] == pytest.approx(ratio)
    assert metrics["score.teacher.lo"] == metrics["test.teacher.lo.acc"]
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("TargetNet (lenet5:0.25) ") and "train-amalgamating-gan 30" in description
    assert metrics["test.teacher.lo.acc"] > 0.8
    results = {a.path for a in client.list_artifacts(parent_id, "results")}
    assert {"results/results.md", "results/confusion.png", "results/samples_grid.png"} <= results

    # the model is logged by the regroup stage's run and registered after the evaluation, with its scores
    name = f"{experiment}-targetnet"
    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.run_id == by_name["regroup-target-net"].info.run_id
    assert float(version.tags["score.union"]) == pytest.approx(metrics["score.union"], rel=1e-5)
    assert version.tags["test.dataset"] == "mnist" and version.description.startswith("TargetNet (lenet5")
    for alias in ("candidate", "best"):
        assert client.get_model_version_by_alias(name, alias).version == version.version
    assert parent.data.tags["dfka.model"] == f"models:/{name}/{version.version}"
    assert summary["registered_model"]["name"] == name and summary["verdict"] in proc.stdout

    # the TargetNet loads from the bucket and predicts one score per label
    net, meta = load_targetnet(f"{runs}/regroup-target-net")
    assert meta.labels == DIGITS and meta.provenance["run_id"] == run_id
    x, _ = load_split("mnist", "test", labels=DIGITS).tensors()
    assert net(x[:16]).shape == (16, 10)

    # no credential of this run anywhere: its output, stage logs, kfp.local outputs, offline records,
    # the published objects, MLflow params/tags, and the YAML compiled with these credentials in the env
    from pipelines.compile import compile_pipeline

    scanned = assert_run_leaks_no_credentials(
        [stack_env.access_key, stack_env.secret_key],
        outputs={"stdout": proc.stdout, "stderr": proc.stderr},
        folders=[tmp_path / "kfp", Path(os.environ["DFKA_HOME"])],
        prefixes=[runs],
        compiled_yaml=compile_pipeline(tmp_path / "compiled.yaml"),
        tracking_uri=stack_env.mlflow_uri,
        experiment=experiment,
    )
    assert Path(summary["log"]).is_relative_to(tmp_path / "kfp") and scanned > 30
