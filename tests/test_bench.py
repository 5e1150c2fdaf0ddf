"""The benchmark harness: YAML validation, evaluation on Y_cst and sub-tasks, the runner's data-free guard,
result merging, reports and the README block, and a tiny end-to-end run on real MNIST (sequential and
with two worker processes)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from dfka.amalgamation.run import teacher_set_from_bundles
from dfka.amalgamation.union import UnionRule
from dfka.baselines import TeacherEnsemble
from dfka.bench import DATA_FREE, METHODS, WITH_DATA, available_benchmarks, load_benchmark, parse_benchmark
from dfka.bench import jobs as jobs_module
from dfka.bench.report import update_readme, write_report
from dfka.bench.results import FORMAT, add_run, load_results, open_results, record_run, save_results
from dfka.bench.runner import run_benchmark
from dfka.data import mnist_available
from dfka.errors import ConfigError, DataFreeViolation
from dfka.evaluation import build_eval_set, evaluate_model, evaluate_teachers
from tests.toys import toy_batch, toy_teacher

DIGITS = {
    "name": "tiny",
    "dataset": "mnist",
    "teachers": [
        {
            "name": "lo",
            "dataset": "mnist",
            "labels": "digit_0..digit_4",
            "arch": "lenet5:0.25",
            "epochs": 1,
            "batch_size": 256,
        },
        {
            "name": "hi",
            "dataset": "mnist",
            "labels": "digit_5..digit_9",
            "arch": "lenet5:0.25",
            "epochs": 1,
            "batch_size": 256,
        },
    ],
    "student": "lenet5:0.25",
    "seeds": [0],
    "budget_minutes": 0.02,
    "reference_budget_minutes": 0.03,
    "amalgamation": {
        "gan": {"batch_size": 32},
        "blocks": {"batch_size": 32},
        "export": {"samples": 256, "shard_size": 256},
    },
}


def digits(**changes) -> dict:
    return json.loads(json.dumps(DIGITS)) | changes


# --- the YAML schema ----------------------------------------------------------------------------------


@pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
def test_shipped_benchmarks_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dfka.data.rgb import make_rgb_folder

    make_rgb_folder("mnist", tmp_path / "rgb-mnist-32", per_label=2, progress=False)  # rgb-digits' folder
    monkeypatch.setenv("DFKA_DATA_DIR", str(tmp_path))
    names = {p.stem for p in available_benchmarks()}
    assert names >= {"digits", "fashion", "three-teachers", "cross-domain", "multilabel", "custom-subset"}
    assert "rgb-digits" in names
    for path in available_benchmarks():
        cfg = load_benchmark(path)
        assert cfg.name == path.stem and cfg.seeds == [0, 1, 2] and set(cfg.methods) == set(METHODS)
    assert load_benchmark("multilabel").metric == "map" and load_benchmark("digits").metric == "acc"
    assert len(load_benchmark("custom-subset").label_set()) == 6
    assert len(load_benchmark("cross-domain").label_set()) == 20
    assert load_benchmark("cross-domain").dataset == "mnist+fashion"
    cfg = load_benchmark("digits").amalgamation_config(seed=2, threads=1)
    assert cfg.seed == 2 and cfg.gan.budget.seconds == pytest.approx(0.4 * 10 * 60)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"budgets": 3}, "budgets"),
        ({"methods": ["dfka", "dafl2"]}, "methods"),
        ({"methods": ["dfka", "dfka"]}, "duplicates"),
        ({"baselines": {"dfad": {"student_step": 5}}}, "student_step"),
        ({"baselines": {"kd_rea": {}}}, "kd_rea"),
        ({"amalgamation": {"seed": 3}}, "set by the benchmark"),
        ({"amalgamation": {"gan": {"batchsize": 3}}}, "batchsize"),
        ({"target_labels": ["digit_1", "t_shirt"]}, "owned by no teacher"),
        ({"dataset": "mnsit"}, "did you mean mnist"),
        ({"student": "lenet6"}, "unknown architecture"),
        ({"budget_minutes": 0}, "budget_minutes"),
        ({"dataset": "mosaic"}, "is multiclass but the benchmark is multilabel"),
    ],
)
def test_invalid_benchmarks_are_rejected_with_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_benchmark(digits(**change))


def test_unknown_benchmark_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="digits"):
        load_benchmark("digitz")


# --- evaluation -----------------------------------------------------------------------------------------


def test_subtask_metrics_for_a_reordered_custom_label_set() -> None:
    """Y_cst = 4 of 8 toy labels in a custom order: union accuracy over Y_cst images, per-teacher accuracy
    on that teacher's Y_cst labels with the argmax restricted to them; the ensemble equals each teacher there."""
    a, b = toy_teacher([0, 1, 2, 3], name="a", seed=1), toy_teacher([4, 5, 6, 7], name="b", seed=2)
    target = ["toy_6", "toy_1", "toy_3", "toy_4"]
    teachers = teacher_set_from_bundles([a, b], target)
    union = UnionRule(teachers)
    classes = [6, 1, 3, 4]
    images, idx = toy_batch(classes, 300, torch.Generator().manual_seed(3))
    ev = build_eval_set(images, idx, target, "multiclass", teachers)
    assert ev.subtasks["a"].positions == [1, 2] and ev.subtasks["b"].positions == [3, 0]
    assert sorted(ev.subtasks["a"].index.tolist() + ev.subtasks["b"].index.tolist()) == list(range(300))
    metrics, scores = evaluate_model(TeacherEnsemble(teachers, union), ev)
    assert metrics["acc"] == pytest.approx(float((scores.argmax(1) == idx).float().mean()))
    own = evaluate_teachers(teachers, ev)
    assert metrics["task.a.acc"] == pytest.approx(own["teacher.a.acc"])  # disjoint logit concat: exact
    assert metrics["task.b.acc"] == pytest.approx(own["teacher.b.acc"])
    assert own["teacher.a.acc"] > 0.9 and own["teacher.b.acc"] > 0.9


def test_multilabel_metrics_are_map() -> None:
    a = toy_teacher([0, 1, 2, 3], name="a", task="multilabel", seed=1)
    b = toy_teacher([4, 5, 6, 7], name="b", task="multilabel", seed=2)
    teachers = teacher_set_from_bundles([a, b], None)
    images, idx = toy_batch(range(8), 200, torch.Generator().manual_seed(4))
    targets = torch.nn.functional.one_hot(idx, 8).float()
    ev = build_eval_set(images, targets, teachers.target_labels, "multilabel", teachers)
    metrics, _ = evaluate_model(TeacherEnsemble(teachers, UnionRule(teachers)), ev)
    assert set(metrics) == {"map", "task.a.map", "task.b.map"}
    own = evaluate_teachers(teachers, ev)
    assert set(own) == {"teacher.a.map", "teacher.b.map"} and min(own.values()) > 0.5


# --- the runner's guard ------------------------------------------------------------------------------


@pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
def test_runner_runs_data_free_methods_inside_the_guard(monkeypatch) -> None:
    """Whatever a data-free method does, the runner wraps it: reading training images raises."""
    from dfka.data import load_split

    def leaky(ctx):
        load_split("mnist", "train", labels=["digit_0"])
        return "trained"

    for method in METHODS:
        monkeypatch.setitem(jobs_module.TRAINERS, method, leaky)
    ctx = SimpleNamespace(cfg=SimpleNamespace(name="tiny"))
    for method in DATA_FREE:
        with pytest.raises(DataFreeViolation, match=method):
            jobs_module.train_method(ctx, method)
    for method in (*WITH_DATA, "ensemble"):
        assert jobs_module.train_method(ctx, method) == "trained"


# --- result files, reports, README ------------------------------------------------------------------


def _header(student: str = "lenet5:0.5", weights: str = "w") -> dict:
    return {
        "benchmark": "fake",
        "description": "a fake benchmark",
        "config": {"dataset": "mnist", "student": student},
        "task": "multiclass",
        "metric": "acc",
        "label_set": ["digit_0", "digit_1"],
        "teachers": {
            "t0": {"recipe_sha256": "x", "weights_sha256": weights, "train_seconds": 3.0, "epochs": 1}
        },
        "reference": {
            "ensemble": {"acc": 0.9, "task.t0.acc": 0.99},
            "teachers": {"teacher.t0.acc": 0.99},
            "teachers_params": 1000,
            "teachers_flops": 2000,
            "per_teacher": {"t0": {"params": 1000, "flops": 2000}},
            "test_images": 2000,
            "probe": {"split": "dev", "images": 100, "points": 20, "ensemble": 0.88},
        },
        "machine": {"cpu": "Test CPU", "cores": 2, "threads": 1, "torch": "2.x", "jobs": 1},
    }


def _run(method: str, seed: int, acc: float, budget: float = 1.0) -> dict:
    return {
        "method": method,
        "seed": seed,
        "status": "ok",
        "metrics": {"acc": acc, "task.t0.acc": acc, "agreement": acc},
        "stages": {
            "train": {"seconds": 60.0 * budget, "steps": 10, "samples": 640, "samples_per_second": 10.7}
        },
        "params": 250,
        "flops": 500,
        "budget_minutes": budget,
        "threads": 1,
        "machine": {"cpu": "Test CPU", "jobs": 1, "git": "abc1234"},
        # reaches 0.95 × 0.88 (the probe's ensemble) = 0.836 at 30 s when acc does, else never
        "curve": {"seconds": [0.0, 30.0, 60.0], "values": [0.1, acc, acc]},
    }


def test_a_v1_result_file_reads_in_todays_metric_names(tmp_path: Path) -> None:
    """Result files written before the metric names were unified keep working (and keep their rows)."""
    v1 = {**_header(), "format": "dfka.bench/v1"}
    v1["reference"] = {**v1["reference"], "ensemble": {"union_acc": 0.9, "acc.t0": 0.99}}
    v1["reference"]["teachers"] = {"teacher_acc.t0": 0.98}
    old_run = _run("dafl", 0, 0.8)
    old_run["metrics"] = {"union_acc": 0.8, "acc.t0": 0.7, "agreement": 0.75}
    v1["runs"] = {"dafl/0": old_run}
    (tmp_path / "fake.json").write_text(json.dumps(v1))
    data = load_results(tmp_path / "fake.json")
    assert data is not None and data["format"] == FORMAT
    assert data["reference"]["ensemble"] == {"acc": 0.9, "task.t0.acc": 0.99}
    assert data["reference"]["teachers"] == {"teacher.t0.acc": 0.98}
    assert data["runs"]["dafl/0"]["metrics"] == {"acc": 0.8, "task.t0.acc": 0.7, "agreement": 0.75}


def test_results_accumulate_replace_and_archive_when_the_experiment_changes(tmp_path: Path) -> None:
    data = open_results(tmp_path, _header())
    for method, seed, acc in [("dafl", 0, 0.8), ("dafl", 1, 0.82), ("noise", 0, 0.3)]:
        add_run(data, _run(method, seed, acc))
    save_results(tmp_path, data)
    again = open_results(tmp_path, _header())  # a partial re-run: old rows stay, same key replaces
    add_run(again, _run("dafl", 1, 0.9))
    save_results(tmp_path, again)
    rows = list(csv.DictReader((tmp_path / "fake.csv").open()))
    assert [(r["method"], r["seed"], r["acc"]) for r in rows] == [
        ("dafl", "0", "0.8"),
        ("dafl", "1", "0.9"),
        ("noise", "0", "0.3"),
    ]
    assert rows[0]["ensemble.acc"] == "0.9" and rows[0]["teacher.t0.acc"] == "0.99"
    assert rows[0]["params_ratio"] == "0.25" and rows[0]["seconds.train"] == "60"
    changed = open_results(tmp_path, _header(student="lenet5:1"))  # another student: not comparable
    assert changed["runs"] == {}
    assert len(list(tmp_path.glob("fake.stale-*.json"))) == 1


def test_two_invocations_on_one_benchmark_keep_each_others_rows(tmp_path: Path) -> None:
    baselines = open_results(tmp_path, _header())  # e.g. `--methods dafl` on one core ...
    dfka = open_results(tmp_path, _header())  # ... and `--methods dfka` on the other
    record_run(tmp_path, baselines, _run("dafl", 0, 0.8))
    record_run(tmp_path, dfka, _run("dfka", 0, 0.85))
    record_run(tmp_path, baselines, _run("dafl", 1, 0.81))
    rows = list(csv.DictReader((tmp_path / "fake.csv").open()))
    assert [(r["method"], r["seed"]) for r in rows] == [("dfka", "0"), ("dafl", "0"), ("dafl", "1")]


def test_results_of_retrained_teachers_are_archived_not_mixed(tmp_path: Path) -> None:
    """The same recipe retrained elsewhere gives other weights: the old rows describe other teachers."""
    data = open_results(tmp_path, _header(weights="w1"))
    add_run(data, _run("dafl", 0, 0.8))
    save_results(tmp_path, data)
    assert open_results(tmp_path, _header(weights="w1"))["runs"].keys() == {"dafl/0"}
    retrained = open_results(tmp_path, _header(weights="w2"))
    assert retrained["runs"] == {}
    archived = list(tmp_path.glob("fake.stale-*.json"))
    assert len(archived) == 1 and "dafl/0" in json.loads(archived[0].read_text())["runs"]


def test_report_tables_plot_and_readme_block(tmp_path: Path) -> None:
    out = tmp_path / "results"
    data = open_results(out, _header())
    for method, seed, acc, budget in [("dafl", 0, 0.8, 1), ("dafl", 1, 0.84, 1), ("dfka", 0, 0.85, 2)]:
        add_run(data, _run(method, seed, acc, budget))
    data["runs"]["noise/0"] = _run("noise", 0, 0.0) | {
        "status": "failed",
        "error": "RuntimeError: boom\ntrace",
    }
    save_results(out, data)
    readme = tmp_path / "README.md"
    readme.write_text("# dfka\n\nintro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\nmore\n")
    written = write_report(out, readme=readme)
    md = (out / "fake.md").read_text()
    assert "| dafl | data-free | 82.00 ± 2.83 | 82.00 ± 2.83 |" in md
    assert "teacher `t0`" in md and "99.00" in md and "0.25×" in md
    assert "different budgets" in md and "failed**: noise seed 0: RuntimeError: boom" in md
    assert (out / "fake-accuracy-vs-time.png").stat().st_size > 1000
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# dfka\n\nintro\n<!-- bench:start -->\n")
    assert text.endswith("<!-- bench:end -->\n\nmore\n") and "Test CPU" in text and "82.00 ± 2.83" in text
    assert "| **85.00 (1 seed)** |" in text and "**82.00" not in text  # bold: the best data-free mean
    assert "82.00 ± 2.83 |" in text  # the row's full seed count: no note
    assert (out / "README.md").is_file() and written["fake"]["markdown"] == out / "fake.md"
    assert "time to 0.95× ensemble" in md and "| 30 s (1/2) |" in md  # dafl seed 0 (0.80) never reaches it
    assert "| 30 s |" in md  # dfka's one seed does
    bare = tmp_path / "BARE.md"
    bare.write_text("# no markers\n")
    with pytest.raises(ConfigError, match="bench:start"):
        update_readme(bare, "x")


# --- end to end on real MNIST ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(digits(teacher_cache=str(root / "teachers"))))
    return path


@pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
def test_end_to_end_tiny_benchmark(tiny_yaml: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Every method on real MNIST with seconds of budget: CSV with the interface's columns, markdown,
    plot, sample grids, and one MLflow parent run with a child per (method, seed) (offline here)."""
    from dfka.cli import main

    monkeypatch.setenv("DFKA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "results"
    result = run_benchmark(tiny_yaml, out_dir=out, progress=False, jobs=1)
    assert not result.failed, [r.error for r in result.failed]
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert [r["method"] for r in rows] == list(METHODS) and {r["seed"] for r in rows} == {"0"}
    required = {"method", "seed", "acc", "ensemble.acc", "task.lo.acc", "task.hi.acc", "teacher.lo.acc"}
    required |= {
        "seconds.gan",
        "seconds.blocks",
        "seconds.train",
        "samples_per_second.gan",
        "params",
        "flops",
    }
    assert required <= set(rows[0])
    by = {r["method"]: r for r in rows}
    assert float(by["ensemble"]["acc"]) > 0.6 and float(by["kd-real"]["acc"]) > 0.3
    assert float(by["dfka"]["seconds.gan"]) > 0 and by["dafl"]["seconds.gan"] == ""
    assert [float(by[m]["budget_minutes"]) for m in ("dfka", "dafl", "kd-real", "layerwise")] == [
        0.02,
        0.02,
        0.03,
        0.03,
    ]
    for method in ("dfka", "dafl", "dfad", "noise"):
        assert (out / f"tiny-samples-{method}.png").is_file()
    assert (out / "tiny.md").is_file() and (out / "tiny-accuracy-vs-time.png").is_file()
    records = [json.loads(p.read_text().splitlines()[0]) for p in (tmp_path / "home").rglob("*.jsonl")]
    parents = [r for r in records if r["parent_local_id"] is None]
    assert len(parents) == 1 and len(records) == 1 + len(METHODS)
    runs = json.loads((out / "tiny.json").read_text())["runs"]
    for key, run in runs.items():  # every trained method has an accuracy-vs-time curve on the probe set
        if run["method"] != "ensemble":
            curve = run["curve"]
            assert curve["seconds"] == sorted(curve["seconds"]) and curve["values"], key
            assert all(0.0 <= v <= 1.0 for v in curve["values"]), key
    # this checkout may hold uncommitted edits; the refusal itself is tested on fixed records
    assert main(["bench", "report", "--out", str(out), "--allow-dirty"]) == 0
    assert "tiny" in (out / "README.md").read_text()


@pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
def test_dev_split_is_a_fixed_subset_of_training_images_kept_apart_from_test_results(
    tiny_yaml: Path, tmp_path: Path
) -> None:
    """--eval-split dev scores on DEV_IMAGES fixed training images (never the test split) and writes a
    result set that cannot mix with test-split rows."""
    from dfka.bench.evaluate import DEV_IMAGES, load_eval_set
    from dfka.data import load_split

    cfg = load_benchmark(tiny_yaml)
    teachers = teacher_set_from_bundles(
        [
            toy_teacher([0, 1, 2, 3, 4], name="lo", labels=[f"digit_{i}" for i in range(5)], steps=1),
            toy_teacher([3, 4, 5, 6, 7], name="hi", labels=[f"digit_{i}" for i in range(5, 10)], steps=1),
        ],
        [f"digit_{i}" for i in range(10)],
    )
    dev = load_eval_set(cfg.dataset, teachers, cfg.task, "dev")
    again = load_eval_set(cfg.dataset, teachers, cfg.task, "dev")
    assert len(dev) == DEV_IMAGES and torch.equal(dev.images, again.images)
    train = {x.tobytes() for x in load_split("mnist", "train").images}
    test = load_split("mnist", "test").images
    dev_pixels = (dev.images * 255).round().to(torch.uint8).numpy()
    assert all(x.tobytes() in train for x in dev_pixels)
    assert sum(x.tobytes() in train for x in test[:500]) < 5  # test images are not in the training split
    out = tmp_path / "results"
    run = run_benchmark(tiny_yaml, methods=["ensemble"], out_dir=out, eval_split="dev", mlflow=False)
    assert json.loads((out / "tiny.json").read_text())["config"]["eval_split"] == "dev"
    assert "**dev** images" in run.outputs["markdown"].read_text()
    run_benchmark(tiny_yaml, methods=["ensemble"], out_dir=out, mlflow=False)  # test split: archives dev
    assert len(list(out.glob("tiny.stale-*.json"))) == 1


@pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
def test_parallel_jobs_then_a_rerun_replaces_its_rows(tiny_yaml: Path, tmp_path: Path) -> None:
    """--jobs 2: one worker process per job, one torch thread each; a later run replaces its (method, seed)."""
    out = tmp_path / "results"
    first = run_benchmark(
        tiny_yaml, methods=["noise", "kd-real"], out_dir=out, jobs=2, mlflow=False, progress=False
    )
    assert not first.failed, [r.error for r in first.failed]
    assert {r.threads for r in first.results} == {1}
    again = run_benchmark(tiny_yaml, methods=["noise"], out_dir=out, mlflow=False, progress=False, threads=1)
    assert not again.failed
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert sorted((r["method"], r["seed"], r["jobs"]) for r in rows) == [
        ("kd-real", "0", "2"),
        ("noise", "0", "1"),
    ]


@pytest.mark.integration
@pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
def test_mlflow_parent_and_children_with_identical_keys(stack_env, tiny_yaml: Path, tmp_path: Path) -> None:
    """On a real MLflow server: one parent run per invocation, one child per (method, seed), and every
    child carries the same param keys and final-metric keys, so methods compare side by side."""
    from mlflow.tracking import MlflowClient

    result = run_benchmark(
        tiny_yaml,
        methods=["ensemble", "noise", "kd-real"],
        out_dir=tmp_path,
        experiment="bench-test",
        progress=False,
    )
    assert not result.failed
    client = MlflowClient(stack_env.mlflow_uri)
    exp = client.get_experiment_by_name("bench-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.info.run_name for r in children) == [
        "ensemble-seed0",
        "kd-real-seed0",
        "noise-seed0",
    ]
    # the evaluate stage's metric names (test.student.acc, ...), so bench and pipeline runs line up in MLflow
    final = {"test.student.acc", "test.ensemble.acc", "test.student.task.lo.acc", "test.teacher.hi.acc"}
    final |= {"test.ensemble.task.hi.acc", "agreement", "params", "seconds.total"}
    for child in children:
        assert set(child.data.params) == set(children[0].data.params)
        assert final <= set(child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"tiny.csv", "tiny.md", "tiny-accuracy-vs-time.png"} <= artifacts


def test_machine_line_names_each_setup_once_with_the_load_range() -> None:
    from dfka.bench.machine import describe_all

    base = {"cpu": "Test CPU", "cores": 2, "device": "cpu", "torch": "2.x", "threads": 1}
    runs = [base | {"jobs": 2, "load_average": 1.2}, base | {"jobs": 2, "load_average": 1.9}]
    line = describe_all([*runs, base | {"jobs": 1, "load_average": 2.0}])
    assert line.count("Test CPU") == 2 and "× 2 parallel jobs" in line
    assert line.endswith("load 1.2–2 at the runs' start")
    assert describe_all(runs[:1]).endswith("load 1.2 at start") and describe_all([]) == "unknown"


def test_dfka_paper_row_runs_the_paper_method_under_the_same_budget() -> None:
    from dfka.amalgamation.config import AmalgamationConfig
    from dfka.bench.jobs import paper_config

    dfka = AmalgamationConfig.model_validate({"budget_minutes": 4, "seed": 3, "student": "lenet5:1.0"})
    paper = paper_config(dfka)
    assert paper.preset == "paper" and paper.seed == 3 and paper.student == "lenet5:1.0"
    assert paper.gan.conditional == "off" and paper.regroup.finetune is None and paper.gan.loss.bn == 0
    # the fine-tune's share goes to block training: the total stays 4 minutes
    assert paper.gan.budget.seconds + paper.blocks.budget.seconds == pytest.approx(240)
    assert dfka.gan.conditional == "auto" and dfka.regroup.finetune is not None  # the dfka row is untouched


def test_report_refuses_rows_from_uncommitted_code_unless_allowed(tmp_path: Path, capsys) -> None:
    from dfka.cli import main

    out = tmp_path / "results"
    data = open_results(out, _header())
    add_run(data, _run("dafl", 0, 0.8))
    dirty = _run("dfka", 0, 0.85)
    dirty["machine"] = {**dirty["machine"], "git": "abc1234-dirty"}
    add_run(data, dirty)
    save_results(out, data)
    assert main(["bench", "report", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 result row(s)" in err and "fake dfka/0 (abc1234-dirty)" in err and "--allow-dirty" in err
    assert not (out / "fake.md").exists()
    assert main(["bench", "report", "--out", str(out), "--allow-dirty"]) == 0
    assert "**not from committed code**: fake dfka/0 (abc1234-dirty)" in (out / "fake.md").read_text()
    rows = list(csv.DictReader((out / "fake.csv").open()))
    assert {r["method"]: r["commit"] for r in rows} == {"dafl": "abc1234", "dfka": "abc1234-dirty"}


def test_code_version_is_dirty_for_code_changes_not_for_benchmark_results(tmp_path: Path) -> None:
    from dfka.bench.machine import git_version

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "fake.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_version(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "results" / "fake.json").write_text('{"runs": {}}\n')  # a run wrote rows
    assert git_version(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_version(tmp_path) == clean + "-dirty"
    assert git_version(tmp_path / "no-such-dir") is None
