"""dfka.stages without kfp: plain functions over local folders, chained like the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from dfka import stages
from dfka.amalgamation.config import AmalgamationConfig
from dfka.amalgamation.regroup import load_targetnet
from dfka.amalgamation.run import amalgamate
from dfka.amalgamation.samples import read_manifest
from dfka.bundles import load_bundle, save_bundle
from dfka.data import is_data_free, load_split
from dfka.errors import CompatibilityError, ConfigError, LabelError
from dfka.models import build_model
from dfka.stages.component_io import write_metrics
from tests.toys import toy_teacher

TOY_METHOD = {
    "student": "lenet5:0.5",
    "device": "cpu",
    "gan": {"batch_size": 16, "budget": {"steps": 12}, "widths": 8},
    "export": {"samples": 200, "shard_size": 80},
    "blocks": {"batch_size": 16, "budget": {"steps": 12}},
    "regroup": {"finetune": {"steps": 12}},
}


def toy_bundles(tmp: Path, **overrides) -> list[str]:
    """Two toy teachers (12x12 images) as bundle folders."""
    uris = []
    for classes, name, seed in (([0, 1, 2, 3], "a", 1), ([4, 5, 6, 7], "b", 2)):
        b = toy_teacher(classes, name=name, seed=seed, steps=20, **overrides.get(name, {}))
        save_bundle(b.model, tmp / name, name=name, labels=b.labels, task=b.task)
        uris.append(str(tmp / name))
    return uris


def tiny_mnist_teacher(labels: list[str], out: str, name: str, steps: int = 80, seed: int = 0) -> str:
    """A LeNet-5 (width 0.25, 3 blocks) on the first 6000 training images of ``labels``: seconds, not minutes."""
    torch.manual_seed(seed)
    train = load_split("mnist", "train", labels=labels)
    x, y = train.tensors()
    x, y = x[:6000], y[:6000]
    spec = {
        "arch": "lenet5",
        "width": 0.25,
        "blocks": 3,
        "num_outputs": len(labels),
        "input_shape": [1, 28, 28],
    }
    model = build_model(spec, mean=[0.13], std=[0.31])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_bundle(model, out, name=name, labels=labels, task="multiclass", training={"dataset": "mnist"})
    return out


# ---------------------------------------------------------------- ingestion


def test_ingest_resolves_labels_by_name_and_reports(tmp_path: Path) -> None:
    uris = toy_bundles(tmp_path)
    out = tmp_path / "ts"
    r = stages.ingest_teachers(
        uris, str(out), target_labels="TOY_5, toy_1,toy_4", amalgamation=TOY_METHOD, seed=3
    )
    assert r["target_labels"] == ["toy_5", "toy_1", "toy_4"]
    doc = json.loads((out / "teacher_set.json").read_text())
    cfg = doc["config"]
    assert cfg["amalgamation"]["target_labels"] == ["toy_5", "toy_1", "toy_4"]
    assert cfg["amalgamation"]["seed"] == 3 and cfg["teachers"] == uris
    report = doc["report"]
    assert report["teachers"]["a"]["labels"] == ["toy_0", "toy_1", "toy_2", "toy_3"]
    assert report["teachers"]["a"]["target_labels"] == ["toy_1"]
    assert report["teachers"]["b"]["params"] > 0 and report["teachers"]["b"]["flops"] > 0
    assert report["shared_labels"] == []
    for name in ("a", "b"):
        assert (out / "teachers" / name / "teacher.json").is_file()
        assert (out / "teachers" / name / "weights.safetensors").is_file()
    assert "| a |" in (out / "report.md").read_text()
    assert r["metrics"]["teachers.count"] == 2 and r["metrics"]["labels.target"] == 3
    # same teachers and config -> same hash; another seed -> another hash
    again = stages.ingest_teachers(
        uris, str(tmp_path / "ts2"), target_labels="toy_5,toy_1,toy_4", amalgamation=TOY_METHOD, seed=3
    )
    other = stages.ingest_teachers(
        uris, str(tmp_path / "ts3"), target_labels="toy_5,toy_1,toy_4", amalgamation=TOY_METHOD, seed=4
    )
    assert again["config_hash"] == r["config_hash"] != other["config_hash"]


def test_ingest_shared_labels_and_union_default(tmp_path: Path) -> None:
    uris = toy_bundles(tmp_path, b={"labels": ["toy_4", "toy_5", "toy_6", "toy_0"]})
    r = stages.ingest_teachers(uris, str(tmp_path / "ts"), amalgamation=TOY_METHOD)
    assert r["target_labels"] == ["toy_0", "toy_1", "toy_2", "toy_3", "toy_4", "toy_5", "toy_6"]
    report = json.loads((tmp_path / "ts" / "teacher_set.json").read_text())["report"]
    assert report["shared_labels"] == ["toy_0"]


def test_ingest_rejects_bad_input(tmp_path: Path) -> None:
    uris = toy_bundles(tmp_path)
    with pytest.raises(LabelError, match="cat"):
        stages.ingest_teachers(uris, str(tmp_path / "x"), target_labels="toy_1,cat")
    with pytest.raises(CompatibilityError, match="at least 2"):
        stages.ingest_teachers(uris[:1], str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"gan\.budgett"):
        stages.ingest_teachers(uris, str(tmp_path / "x"), amalgamation={"gan": {"budgett": {"steps": 1}}})
    c = toy_teacher([6, 7], name="c", blocks=2, steps=1)
    save_bundle(c.model, tmp_path / "c", name="c", labels=c.labels, task=c.task)
    with pytest.raises(CompatibilityError, match="blocks"):
        stages.ingest_teachers([uris[0], str(tmp_path / "c")], str(tmp_path / "x"))


# ---------------------------------------------------------------- stages 1-3


def test_stage_chain_on_toy_teachers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uris = toy_bundles(tmp_path)
    method = {**TOY_METHOD, "union": {"routing": "bias"}}
    ts, gan, exp, dual, net = (str(tmp_path / n) for n in ("ts", "gan", "export", "dual", "net"))
    stages.ingest_teachers(uris, ts, amalgamation=method)

    import dfka.stages.training as training

    seen = []
    real_train_blocks = training.train_blocks

    def spy(*args, **kwargs):
        seen.append(is_data_free())
        return real_train_blocks(*args, **kwargs)

    monkeypatch.setattr(training, "train_blocks", spy)

    r1 = stages.train_amalgamating_gan(ts, gan)
    assert (Path(gan) / "gan.json").is_file() and (Path(gan) / "samples_grid.png").is_file()
    assert (
        read_manifest(str(Path(gan) / "trajectory")).count > 0
    )  # the trajectory reservoir travels with the GAN
    assert r1["metrics"]["stage.steps"] == 12

    r2 = stages.export_synthetic_samples(ts, gan, exp)
    location = json.loads((Path(exp) / "location.json").read_text())
    manifest = read_manifest(location["uri"])
    assert manifest.count == 200 and len(manifest.shards) == 3
    assert set(manifest.extra["routing"]) == {"a", "b"}
    assert manifest.extra["generator_channels"]["0"] == 1
    assert r2["metrics"]["samples.from_trajectory"] > 0
    assert 0 <= r2["metrics"]["samples.balance"] <= 1

    r3 = stages.train_dual_generator_blocks(ts, exp, dual)
    assert seen == [True]  # stage 2 ran under the data-free guard
    assert r3["metrics"]["stage.steps"] >= 12 and (Path(dual) / "dual.safetensors").is_file()

    r4 = stages.regroup_target_net(ts, exp, dual, net)
    assert r4["registered_model"] is None  # no tracking context: nothing logged anywhere
    model, meta = load_targetnet(net)
    assert meta.labels == [f"toy_{i}" for i in range(8)]
    assert model(torch.rand(3, 1, 12, 12)).shape == (3, 8)
    assert (Path(net) / "targetnet.torchscript.pt").is_file()
    for out in (ts, gan, exp, dual, net):
        assert json.loads((Path(out) / "result.json").read_text())["seconds"] > 0

    # the chain of stages, with its artifacts in between, is exactly the in-process engine
    reference = amalgamate(
        [load_bundle(u) for u in uris], AmalgamationConfig.model_validate(method), progress=False
    ).targetnet.cpu()
    x = torch.rand(16, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_budget_minutes_means_the_same_in_the_pipeline_as_in_one_process(tmp_path: Path) -> None:
    """Stages 2 and 3 of the pipeline split what stage 1 and the export spent of ``budget_minutes``,
    as ``dfka amalgamate`` does (run.remaining_budget): the export records the spent seconds, and the
    whole run stays within the budget."""
    from dfka.amalgamation.artifacts import gan_report
    from dfka.amalgamation.samples import read_manifest

    uris = toy_bundles(tmp_path)
    method = {k: v for k, v in TOY_METHOD.items() if k not in ("regroup",)}
    method["gan"] = {"batch_size": 16, "widths": 8}
    method["blocks"] = {"batch_size": 16}
    method["export"] = {"samples": 200000, "shard_size": 100000}  # a top-up that takes its 10% cap
    method |= {"budget_minutes": 0.2, "budget_split": {"gan": 0.4, "blocks": 0.2, "finetune": 0.4}}
    ts, gan, exp, dual, net = (str(tmp_path / n) for n in ("ts", "gan", "export", "dual", "net"))
    stages.ingest_teachers(uris, ts, amalgamation=method)
    stages.train_amalgamating_gan(ts, gan)
    r2 = stages.export_synthetic_samples(ts, gan, exp)
    spent = read_manifest(r2["outputs"]["samples"]).extra["budget_spent_seconds"]
    assert spent == pytest.approx(gan_report(gan)["seconds"] + r2["report"]["seconds"])
    r3 = stages.train_dual_generator_blocks(ts, exp, dual)
    r4 = stages.regroup_target_net(ts, exp, dual, net)
    assert r2["report"]["seconds"] > 0.8  # the export's time is spent, and must come off stages 2 and 3
    left = 12.0 - spent  # split 1:2 between the blocks and the fine-tune, as in one process
    assert r3["report"]["seconds"] == pytest.approx(left / 3, abs=0.2)  # a fixed share would be 2.4 s
    assert spent + r3["report"]["seconds"] + r4["report"]["seconds"] == pytest.approx(12.0, abs=0.4)


def test_write_metrics_writes_the_file_for_caching(tmp_path: Path) -> None:
    class FakeMetrics:
        path = str(tmp_path / "task" / "metrics")
        metadata: ClassVar[dict] = {}

        def log_metric(self, key, value):
            self.metadata[key] = value

    m = FakeMetrics()
    write_metrics(m, {"a": 1, "b": 2.5, "nan": float("nan")})
    assert m.metadata == {"a": 1.0, "b": 2.5}
    assert json.loads(Path(m.path).read_text()) == {"a": 1.0, "b": 2.5}


# ---------------------------------------------------------------- evaluation on real test images


@pytest.fixture(scope="module")
def mnist_teachers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("mnist-teachers")
    return [
        tiny_mnist_teacher([f"digit_{i}" for i in range(5)], str(root / "lo"), "lo", seed=1),
        tiny_mnist_teacher([f"digit_{i}" for i in range(5, 10)], str(root / "hi"), "hi", seed=2),
    ]


def test_evaluate_scores_teachers_ensemble_and_targetnet(tmp_path: Path, mnist_teachers: list[str]) -> None:
    method = {
        "student": "lenet5:0.25",
        "device": "cpu",
        "gan": {"batch_size": 32, "budget": {"steps": 15}, "widths": 8},
        "export": {"samples": 256, "shard_size": 256},
        "blocks": {"batch_size": 32, "budget": {"steps": 15}},
        "regroup": {"finetune": {"steps": 12}},
    }
    ts, gan, exp, dual, net, ev = (str(tmp_path / n) for n in ("ts", "gan", "export", "dual", "net", "eval"))
    r = stages.ingest_teachers(mnist_teachers, ts, target_labels="digit_0..digit_9", amalgamation=method)
    assert r["evaluation_dataset"] == "mnist"  # from the teachers' manifests
    stages.train_amalgamating_gan(ts, gan)
    stages.export_synthetic_samples(ts, gan, exp)
    stages.train_dual_generator_blocks(ts, exp, dual)
    stages.regroup_target_net(ts, exp, dual, net)
    result = stages.evaluate(ts, net, exp, ev)

    m = result["metrics"]
    for key in (
        "test.student.acc",
        "test.ensemble.acc",
        "test.teacher.lo.acc",
        "test.teacher.hi.acc",
        "test.student.task.lo.acc",
        "test.ensemble.task.hi.acc",
        "test.student.acc.digit_7",
        "student.params",
        "teachers.flops",
    ):
        assert key in m, key
    # each teacher on its own labels: the teacher's argmax over its outputs, on the test images of its labels
    from dfka.bundles import load_bundle

    lo = load_bundle(mnist_teachers[0]).model
    x, y = load_split("mnist", "test", labels=[f"digit_{i}" for i in range(5)]).tensors()
    with torch.no_grad():
        direct = float((lo(x).argmax(1) == y).float().mean())
    assert m["test.teacher.lo.acc"] == pytest.approx(direct, abs=1e-6)
    assert m["test.teacher.lo.acc"] > 0.8  # a real teacher, even after 80 steps

    # the benchmarks score the same TargetNet, ensemble and teachers identically (dfka.evaluation)
    from dfka.amalgamation.regroup import load_targetnet
    from dfka.bench.evaluate import load_eval_set
    from dfka.evaluation import evaluate_model, evaluate_teachers
    from dfka.stages._common import load_teacher_set

    teacher_set = load_teacher_set(ts, device="cpu")
    bench_set = load_eval_set("mnist", teacher_set.teachers, "multiclass")
    target = load_targetnet(net)[0].eval()
    bench = {f"student.{k}": v for k, v in evaluate_model(target, bench_set)[0].items()}
    ensemble = evaluate_model(
        lambda x: teacher_set.union({n: t(x) for n, t in teacher_set.teachers}), bench_set
    )
    bench |= {f"ensemble.{k}": v for k, v in ensemble[0].items()}
    bench |= evaluate_teachers(teacher_set.teachers, bench_set)
    # one set of names: every benchmark score is the stage's metric of the same name, under test.
    assert set(bench) == {
        f"{who}.{key}" for who in ("student", "ensemble") for key in ("acc", "task.lo.acc", "task.hi.acc")
    } | {"teacher.lo.acc", "teacher.hi.acc"}
    assert {k: m[f"test.{k}"] for k in bench} == pytest.approx(bench, abs=1e-12)
    confusion = result["confusion"]
    assert confusion["labels"][0] == "digit_0" and sum(map(sum, confusion["matrix"])) == 10000
    assert "TargetNet (lenet5:0.25)" in result["markdown"] and "teacher ensemble" in result["markdown"]
    assert "data:image/png;base64," in (Path(ev) / "report.html").read_text()
    for name in ("results.json", "results.md", "confusion.png", "samples_grid.png"):
        assert (Path(ev) / name).is_file(), name

    # the same 10,000 test images as a user's folder test set (PNG is lossless): the same numbers
    from PIL import Image

    folder = tmp_path / "own-test-set"
    images, targets = load_split("mnist", "test").tensors()
    for i, (img, label) in enumerate(zip(images, targets.tolist())):
        (folder / f"digit_{label}").mkdir(parents=True, exist_ok=True)
        pixels = (img[0].numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels, "L").save(folder / f"digit_{label}" / f"{i:05d}.png")
    own = stages.evaluate(ts, net, exp, str(tmp_path / "eval-own"), dataset=str(folder))
    assert own["results"]["images"] == 10000 and own["results"]["dataset"] == str(folder)
    for key in ("test.student.acc", "test.ensemble.acc", "test.teacher.lo.acc", "test.student.task.hi.acc"):
        assert own["metrics"][key] == pytest.approx(m[key], abs=1e-9), key
    assert own["confusion"]["matrix"] == confusion["matrix"]  # counts do not depend on file order
