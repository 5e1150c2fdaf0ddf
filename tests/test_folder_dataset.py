"""Folder datasets (ROOT/{train,test}/LABEL/IMAGE.png): the RGB export, loading, the guard, and a benchmark
trained and scored on one (RGB teachers of two families, through the public bench runner)."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dfka.bench import load_benchmark
from dfka.bench.runner import run_benchmark
from dfka.data import data_free, label_names, load_split, mnist_available, parse_labels
from dfka.data.rgb import colourise, make_rgb_folder
from dfka.errors import ConfigError, DataError, DataFreeViolation

pytestmark = pytest.mark.skipif(not mnist_available(), reason="needs MNIST (dfka data fetch)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "rgb-mnist-32"
    counts = make_rgb_folder("mnist", out, per_label=12, progress=False)
    assert counts == {"train": 120, "test": 120}
    return out


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_the_rgb_export_is_the_documented_layout_and_reproducible(rgb: Path, tmp_path: Path) -> None:
    assert (rgb / "labels.txt").read_text().split() == [f"digit_{i}" for i in range(10)]
    files = sorted((rgb / "test" / "digit_3").glob("*.png"))
    assert len(files) == 12
    img = Image.open(files[0])
    assert img.mode == "RGB" and img.size == (32, 32)
    again = tmp_path / "again"
    make_rgb_folder("mnist", again, per_label=12, progress=False)
    assert _digest(again) == _digest(rgb)  # same seed, same bytes
    with pytest.raises(ConfigError, match="not empty"):
        make_rgb_folder("mnist", again, per_label=1, progress=False)  # nothing is overwritten


def test_colourise_puts_the_strokes_on_one_colour_pair_per_image() -> None:
    grey = np.zeros((2, 28, 28), np.uint8)
    grey[:, 10:18, 10:18] = 255
    rgb = colourise(grey, np.random.default_rng(0), 32)
    assert rgb.shape == (2, 32, 32, 3)
    for image in rgb:
        corner, stroke = image[0, 0], image[16, 16]
        assert (image[:2] == corner).all() and (stroke >= 127).all() and (corner <= 128).all()
    assert not (rgb[0, 0, 0] == rgb[1, 0, 0]).all()  # colours differ between images
    with pytest.raises(ConfigError, match="below"):
        colourise(grey, np.random.default_rng(0), 20)


def test_labels_come_from_the_folder_and_splits_load_over_a_subset(rgb: Path) -> None:
    assert label_names(str(rgb)) == [f"digit_{i}" for i in range(10)]
    assert parse_labels("DIGIT_7..digit_9,digit_0", str(rgb)) == ["digit_7", "digit_8", "digit_9", "digit_0"]
    part = load_split(str(rgb), "train", labels="digit_5..digit_9")
    assert part.images.shape == (60, 3, 32, 32) and part.images.dtype == np.uint8
    assert part.label_names == ["digit_5", "digit_6", "digit_7", "digit_8", "digit_9"]
    assert np.bincount(part.targets).tolist() == [12] * 5
    pixels = np.asarray(Image.open(sorted((rgb / "train" / "digit_5").glob("*.png"))[0]))
    assert (part.images[0].transpose(1, 2, 0) == pixels).all()  # the file's own pixels, first in order


def test_data_free_stages_cannot_read_a_folder_datasets_training_split(rgb: Path) -> None:
    with data_free("generator training"):
        with pytest.raises(DataFreeViolation, match="train split of the folder dataset"):
            load_split(str(rgb), "train")
        assert len(load_split(str(rgb), "test")) == 120  # the held-out split stays readable, as built-in


def test_bad_folder_datasets_are_one_error_naming_the_fix(rgb: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    (flat / "digit_0").mkdir(parents=True)
    with pytest.raises(DataError, match="needs train/ and test/") as err:
        label_names(str(flat))
    assert "dfka data rgb" in err.value.fix
    mixed = tmp_path / "mixed"
    for split in ("train", "test"):
        for i, side in enumerate((32, 30)):
            (mixed / split / "a").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (side, side)).save(mixed / split / "a" / f"{i}.png")
    with pytest.raises(DataError, match="same size"):
        load_split(str(mixed), "test")
    bad = tmp_path / "bad"
    (bad / "train" / "a b").mkdir(parents=True)
    (bad / "test").mkdir()
    with pytest.raises(DataError, match="safe names"):
        label_names(str(bad))


def test_the_cli_writes_an_rgb_folder(tmp_path: Path) -> None:
    out = tmp_path / "rgb"
    cmd = [sys.executable, "-m", "dfka.cli", "data", "rgb", "fashion", "--out", str(out), "--per-label", "2"]
    from dfka.data import fashion_available

    if not fashion_available():
        pytest.skip("needs Fashion-MNIST")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "20 train / 20 test PNGs" in done.stdout
    assert (out / "labels.txt").read_text().split()[0] == "t_shirt"
    assert len(list((out / "test").rglob("*.png"))) == 20


def test_the_shipped_rgb_benchmark_validates_against_its_folder(
    rgb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DFKA_DATA_DIR", str(rgb.parent))  # the YAML names $DFKA_DATA_DIR/rgb-mnist-32
    cfg = load_benchmark("rgb-digits")
    assert cfg.teacher_labels() == {
        "rgb-0-4": [f"digit_{i}" for i in range(5)],
        "rgb-5-9": [f"digit_{i}" for i in range(5, 10)],
    }
    assert [t.arch.split(":")[0] for t in cfg.teachers] == ["resnet18", "resnet18"]
    monkeypatch.setenv("DFKA_DATA_DIR", str(rgb.parent / "nowhere"))
    with pytest.raises(ConfigError, match="dfka data rgb"):
        load_benchmark("rgb-digits")


def test_a_benchmark_on_an_rgb_folder_trains_teachers_of_two_families_and_scores_its_test_split(
    rgb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DFKA_HOME", str(tmp_path / "home"))
    spec = {
        "name": "tiny-rgb",
        "dataset": str(rgb),
        "teachers": [
            {"name": "lo", "dataset": str(rgb), "labels": "digit_0..digit_4", "arch": "resnet18:0.125"},
            {"name": "hi", "dataset": str(rgb), "labels": "digit_5..digit_9", "arch": "vgg:0.125"},
        ],
        "student": "resnet18:0.125",
        "methods": ["ensemble", "dfka", "kd-real"],
        "seeds": [0],
        "budget_minutes": 0.05,
        "amalgamation": {
            "gan": {"batch_size": 16},
            "blocks": {"batch_size": 16},
            "export": {"samples": 64, "shard_size": 64},
            "regroup": {"batch_size": 16},
        },
    }
    path = tmp_path / "tiny-rgb.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "results"
    run = run_benchmark(path, out_dir=out, progress=False, jobs=1, mlflow=False)
    assert not run.failed, [r.error for r in run.failed]
    rows = {r["method"]: r for r in csv.DictReader((out / "tiny-rgb.csv").open())}
    assert set(rows) == {"ensemble", "dfka", "kd-real"}
    for row in rows.values():  # scored on the folder's 120 test images over all ten labels
        assert 0.0 <= float(row["acc"]) <= 1.0 and row["task.lo.acc"] and row["task.hi.acc"]
    manifests = sorted((tmp_path / "home" / "bench" / "teachers").glob("*/teacher.json"))
    families = {json.loads(m.read_text())["arch"]["arch"] for m in manifests}
    assert families == {"resnet18", "vgg"}
    for m in manifests:
        assert json.loads(m.read_text())["input"]["shape"] == [3, 32, 32]
