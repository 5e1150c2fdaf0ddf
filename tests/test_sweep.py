"""Sweeps: a config's ``sweep:`` section becomes variants, the sweep pipeline compiles like the main one,
and a local sweep of 2 seeds × 2 configs runs through kfp.local against a real SeaweedFS and MLflow."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from dfka import storage
from dfka.errors import ConfigError
from dfka.pipeline_config import STAGES, ExperimentConfig
from dfka.stages.context import RunContext, find_parent
from dfka.stages.sweep import check_variants
from tests.test_stages import tiny_mnist_teacher

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "dfka_sweep.yaml"
DIGITS = [f"digit_{i}" for i in range(10)]


def sweep_config(**sweep: object) -> ExperimentConfig:
    return ExperimentConfig.parse(
        {
            "teachers": ["s3://b/t/lo", "s3://b/t/hi"],
            "amalgamation": {"budget_minutes": 2, "student": "lenet5:1.0"},
            "sweep": sweep,
        }
    )


# ---------------------------------------------------------------- variants


def test_the_grid_is_teacher_sets_by_configs_by_seeds_each_merged_over_the_base() -> None:
    cfg = sweep_config(
        seeds=[0, 3],
        configs={"base": {}, "long": {"budget_minutes": 4}, "no-bn": {"gan": {"loss": {"bn": 0}}}},
        teacher_sets={"ab": ["s3://b/a", "s3://b/b"], "cd": ["s3://b/c", "s3://b/d", "s3://b/e"]},
    )
    variants = cfg.sweep_variants()
    names = [v["variant"] for v in variants]
    assert len(names) == 2 * 3 * 2 == len(set(names))
    assert names[:3] == ["ab-base-s0", "ab-base-s3", "ab-long-s0"]
    by = {v["variant"]: v for v in variants}
    assert by["cd-no-bn-s3"]["teachers"] == ["s3://b/c", "s3://b/d", "s3://b/e"]
    assert by["cd-no-bn-s3"]["seed"] == 3 and by["cd-no-bn-s3"]["config"] == "no-bn"
    assert by["ab-base-s0"]["teacher_set"] == "ab"
    # an override merges key by key and is applied before the budgets are derived from budget_minutes
    assert by["ab-no-bn-s0"]["amalgamation"]["gan"]["loss"]["bn"] == 0
    assert by["ab-no-bn-s0"]["amalgamation"]["student"] == "lenet5:1.0"
    assert by["ab-long-s0"]["amalgamation"]["gan"]["budget"]["seconds"] == pytest.approx(
        2 * by["ab-base-s0"]["amalgamation"]["gan"]["budget"]["seconds"]
    )
    # each variant is exactly the main pipeline's parameters for that config (minus where it is recorded)
    single = ExperimentConfig.parse(
        {
            "teachers": ["s3://b/a", "s3://b/b"],
            "amalgamation": {"budget_minutes": 4, "student": "lenet5:1.0", "seed": 0},
        }
    ).pipeline_arguments(run=False)
    assert {k: v for k, v in by["ab-long-s0"].items() if k in single} == single


def test_without_a_sweep_section_a_sweep_is_the_experiment_once() -> None:
    cfg = ExperimentConfig.parse({"teachers": ["a", "b"], "amalgamation": {"seed": 7}})
    (variant,) = cfg.sweep_variants()
    assert variant["variant"] == "base-s7" and variant["teachers"] == ["a", "b"]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"configs": {"Bad_Name": {}}}, "not a valid variant name"),
        ({"seeds": [1, 1]}, "repeat a seed"),
        ({"teacher_sets": {"one": ["s3://b/a"]}}, "needs 2 or more"),
        ({"configs": {}}, "at least 1"),
        ({"parallelism": 0}, "greater than or equal to 1"),
        ({"seed": [0]}, "sweep.seed"),
    ],
)
def test_a_bad_sweep_section_fails_at_load_and_names_the_key(sweep: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep_config(**sweep)


def test_a_bad_override_names_its_variant() -> None:
    cfg = sweep_config(configs={"fine": {}, "typo": {"gan": {"bugdet": {"steps": 3}}}})
    with pytest.raises(ConfigError, match=r"sweep variant 'typo-s0' is invalid: amalgamation\.gan\.bugdet"):
        cfg.sweep_variants()


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ([], "no variants"),
        ("abc", "no variants"),
        ([["x"]], r"variants\[0\] is a list"),
        ([{"variant": "a", "teachers": [], "seed": 0}], "has no amalgamation"),
        ([{"variant": "../up", "teachers": [], "seed": 0, "amalgamation": {}}], "is named '../up'"),
        ([{"variant": "a", "teachers": [], "seed": 0, "amalgamation": {}}] * 2, "two variants are named 'a'"),
    ],
)
def test_a_hostile_variants_parameter_is_refused_before_any_stage(variants: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_variants(variants)  # type: ignore[arg-type]


def test_a_variant_runs_under_its_own_run_id_and_names_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFKA_KFP_RUN_ID", "local-sweep-1")
    ctx = RunContext.from_env("e", variant="long-s0")
    assert ctx.run_id == "local-sweep-1-long-s0" and ctx.sweep_run_id == "local-sweep-1"
    assert ctx.tags()["dfka.sweep_run_id"] == "local-sweep-1" and ctx.tags()["dfka.variant"] == "long-s0"
    single = RunContext.from_env("e")
    assert single.run_id == "local-sweep-1" and single.sweep_run_id is None
    assert "dfka.variant" not in single.tags()


# ---------------------------------------------------------------- the compiled sweep pipeline


def test_the_committed_sweep_yaml_matches_the_code(tmp_path: Path) -> None:
    from pipelines.compile import compile_sweep

    out = compile_sweep(tmp_path / "sweep.yaml")
    assert COMMITTED.is_file(), "run `dfka pipeline compile` and commit pipelines/dfka_sweep.yaml"
    assert out.read_text() == COMMITTED.read_text(), (
        "pipelines/dfka_sweep.yaml is out of date: run `dfka pipeline compile` and commit the result"
    )


def test_the_sweep_fans_out_the_six_stages_and_gathers_their_evaluations(tmp_path: Path) -> None:
    from pipelines.compile import compile_sweep

    cfg = sweep_config(seeds=[0, 1], parallelism=3)
    spec, _ = yaml.safe_load_all(compile_sweep(tmp_path / "s.yaml", cfg).read_text())
    root = spec["root"]
    assert set(root["inputDefinitions"]["parameters"]) == {
        "variants",
        "experiment",
        "mlflow_tracking_uri",
        "bucket",
    }
    assert len(root["inputDefinitions"]["parameters"]["variants"]["defaultValue"]) == 2
    tasks = root["dag"]["tasks"]
    loop = next(t for t in tasks.values() if "parameterIterator" in t)
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert (
        tasks["gather-sweep"]["inputs"]["artifacts"]["results"]["taskOutputArtifact"]["producerTask"]
        == (loop["taskInfo"]["name"])
    )
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(STAGES) <= set(body)
    assert loop["dependentTasks"] == ["open-sweep"]  # no variant starts before the sweep's MLflow run
    for stage in STAGES:  # every stage knows its variant, so it records under <run id>-<variant>
        params = body[stage]["inputs"]["parameters"]
        assert params["variant"]["componentInputParameter"].endswith("-loop-item"), stage
        assert params["variant"]["parameterExpressionSelector"] == 'parseJson(string_value)["variant"]'


# ---------------------------------------------------------------- a local sweep, for real


@pytest.mark.integration
@pytest.mark.slow
def test_a_local_sweep_of_two_seeds_by_two_configs(stack_env, tmp_path: Path, monkeypatch) -> None:
    bucket = stack_env.bucket
    teachers = [
        tiny_mnist_teacher(DIGITS[:5], f"s3://{bucket}/teachers/sweep/lo", "lo", seed=1),
        tiny_mnist_teacher(DIGITS[5:], f"s3://{bucket}/teachers/sweep/hi", "hi", seed=2),
    ]
    experiment = f"dfka-sweep-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment": experiment,
                "teachers": teachers,
                "evaluation": {"dataset": "mnist"},
                "amalgamation": {
                    "student": "lenet5:0.25",
                    "device": "cpu",
                    "gan": {"batch_size": 16, "budget": {"steps": 6}, "widths": 8},
                    "export": {"samples": 64, "shard_size": 64},
                    "blocks": {"batch_size": 16, "budget": {"steps": 1}},
                    "regroup": {"batch_size": 16, "finetune": {"steps": 10}},
                },
                "pipeline": {"local_root": str(tmp_path / "kfp"), "threads": 1},
                "sweep": {
                    "seeds": [0, 1],
                    "configs": {"short": {}, "long": {"regroup": {"finetune": {"steps": 40}}}},
                },
            },
            sort_keys=False,  # the configs' order is the variants' order
        )
    )
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    summary_file = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "dfka.cli", "pipeline", "sweep"),
            *("--config", str(config), "--results-json", str(summary_file)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads(summary_file.read_text())
    run_id = summary["run_id"]
    names = ["short-s0", "short-s1", "long-s0", "long-s1"]
    assert [r["variant"] for r in summary["rows"]] == names
    assert "## By config (best first)" in proc.stdout and "| long-s1 | 1 |" in proc.stdout

    # each variant ran the six stages under its own prefix, with its own seed and fine-tune budget
    for name in names:
        runs = f"s3://{bucket}/runs/{run_id}-{name}"
        for stage in STAGES:
            assert "result.json" in storage.listdir(f"{runs}/{stage}"), (name, stage)
        teacher_set = json.loads(storage.get_bytes(f"{runs}/ingest-teachers/teacher_set.json"))
        amalgamation = teacher_set["config"]["amalgamation"]
        assert amalgamation["seed"] == int(name[-1])
        assert amalgamation["regroup"]["finetune"]["steps"] == (40 if name.startswith("long") else 10)

    # one comparison: Markdown, CSV, the plot, published under the sweep's own prefix
    gathered = f"s3://{bucket}/runs/{run_id}/gather-sweep"
    assert {"sweep.md", "sweep.csv", "sweep.png", "report.html", "result.json"} <= set(
        storage.listdir(gathered)
    )
    rows = list(csv.DictReader(io.StringIO(storage.get_bytes(f"{gathered}/sweep.csv").decode())))
    assert [r["variant"] for r in rows] == names
    for row, got in zip(rows, summary["rows"], strict=True):
        assert float(row["score"]) == pytest.approx(got["score"]) and 0 <= got["score"] <= 1
        assert float(row["train_seconds"]) > 0 and float(row["pipeline_seconds"]) > float(
            row["train_seconds"]
        )
        assert row["run_id"] == f"{run_id}-{row['variant']}"
    assert storage.get_bytes(f"{gathered}/sweep.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in storage.get_bytes(f"{gathered}/report.html").decode()

    # MLflow: the sweep's run, whose children are the four variants' runs, each with its six stages
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack_env.mlflow_uri)
    sweep_id = find_parent(client, experiment, run_id, kind="sweep")
    assert sweep_id is not None and summary["mlflow"]["parent_run_id"] == sweep_id
    sweep_run = client.get_run(sweep_id)
    assert sweep_run.info.status == "FINISHED"
    assert json.loads(sweep_run.data.params["sweep.variants"]) == names
    for name, row in zip(names, summary["rows"], strict=True):
        assert sweep_run.data.metrics[f"variant.{name}.acc"] == pytest.approx(row["score"])
    assert {"config.short.acc", "config.long.acc"} <= set(sweep_run.data.metrics)
    assert {a.path for a in client.list_artifacts(sweep_id, "sweep")} >= {
        "sweep/sweep.csv",
        "sweep/sweep.png",
    }
    exp_id = sweep_run.info.experiment_id
    variants = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{sweep_id}'")
    assert sorted(v.data.tags["dfka.variant"] for v in variants) == sorted(names)
    for v in variants:
        assert v.info.status == "FINISHED" and v.data.tags["dfka.kind"] == "pipeline"
        assert v.data.tags["dfka.kfp_run_id"] == f"{run_id}-{v.data.tags['dfka.variant']}"
        assert v.info.run_name.startswith(f"{v.data.tags['dfka.variant']} · {experiment} · ")
        stages = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{v.info.run_id}'")
        assert sorted(s.info.run_name for s in stages) == sorted(STAGES)
        assert v.data.metrics["score.union"] == pytest.approx(
            sweep_run.data.metrics[f"variant.{v.data.tags['dfka.variant']}.acc"]
        )


def test_submitting_the_sweep_package_sends_the_configs_variants() -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "pipelines.submit", "--host", "http://127.0.0.1:9", "--dry-run"),
            *("--package", str(COMMITTED), "--config", str(ROOT / "configs" / "sweep-example.yaml")),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    params = json.loads(proc.stdout)["runtime_config"]["parameters"]
    expected = ExperimentConfig.load(ROOT / "configs" / "sweep-example.yaml").sweep_arguments()
    assert params == expected and [v["variant"] for v in params["variants"]] == [
        "default-s0",
        "default-s1",
        "paper-s0",
        "paper-s1",
    ]


def test_a_sweep_of_a_config_without_a_sweep_section_says_what_to_add(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfka.cli",
            "pipeline",
            "sweep",
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "has no sweep: section" in proc.stderr and "dfka pipeline run" in proc.stderr
