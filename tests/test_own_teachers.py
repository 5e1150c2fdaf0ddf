"""Bring your own teachers and test data, through the public CLI against a real SeaweedFS bucket.

A teacher built by a factory defined here (reached through ``DFKA_ARCH_MODULES``) and a registry VGG are
trained on synthetic 32x32 RGB classes with free-form label names, packed with ``dfka teachers pack``
into the bucket, amalgamated with ``dfka amalgamate`` and scored on a folder of PNGs in the bucket.
Every hostile input on those paths ends in one ``error:``/``fix:`` line before any training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from dfka import storage
from dfka.models import BlockClassifier, build_model

REPO = Path(__file__).resolve().parents[1]
FACTORY = f"{__name__}:fauna_net"
VGG = "vgg:0.125:blocks=3"
LABELS_A = ["red_fox", "grey_wolf", "brown_bear"]
LABELS_B = ["sea_otter", "river_eel", "tree_frog"]
SHAPE = (3, 32, 32)
METHOD = {
    "device": "cpu",
    "gan": {"batch_size": 16, "budget": {"steps": 3}, "widths": 8},
    "export": {"samples": 64, "shard_size": 64},
    "blocks": {"batch_size": 16, "budget": {"steps": 3}},
    "regroup": {"batch_size": 16, "finetune": {"steps": 3}},
}


def fauna_net(num_outputs: int, *, input_shape, mean, std, width: float = 1.0) -> BlockClassifier:
    """An organisation's own family: two strided convs and a pooled one; levels 16x16, 8x8, a vector
    (the spatial sizes of ``vgg``/``resnet18`` at three blocks, so the two families amalgamate)."""
    c = max(1, round(8 * width))
    blocks = [
        nn.Sequential(nn.Conv2d(input_shape[0], c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU()),
        nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.BatchNorm2d(2 * c), nn.ReLU()),
        nn.Sequential(
            nn.Conv2d(2 * c, 2 * c, 3, 1, 1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        ),
    ]
    return BlockClassifier(
        blocks,
        nn.Linear(2 * c, num_outputs),
        spec={"arch": "fauna", "num_outputs": num_outputs},
        input_shape=tuple(input_shape),
        mean=mean,
        std=std,
    )


def broken_net(num_outputs: int, *, input_shape, mean, std) -> BlockClassifier:
    raise RuntimeError("weights server unreachable")


def prototypes(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, *SHAPE, generator=g).round()


def sample(classes: list[int], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(classes), (n,), generator=g)
    x = prototypes()[torch.tensor(classes)[idx]] * 0.75 + 0.25 * torch.rand(n, *SHAPE, generator=g)
    return x.clamp(0, 1), idx


def train(model: BlockClassifier, classes: list[int], steps: int = 60) -> BlockClassifier:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        x, y = sample(classes, 32, seed=step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_test_set(root: Path, labels: list[str], per_label: int = 8) -> None:
    from PIL import Image

    for k, label in enumerate(labels):
        (root / label).mkdir(parents=True)
        x, _ = sample([k], per_label, seed=1000 + k)
        for i, img in enumerate(x):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr, "RGB").save(root / label / f"{i:03d}.png")


def dfka(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfka.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_error(proc: subprocess.CompletedProcess, problem: str) -> None:
    """Exit 2, one ``error:`` line naming the problem, a ``fix:`` line, no traceback, nothing trained."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and problem in errors[0], proc.stderr
    assert any(line.strip().startswith("fix:") for line in lines), proc.stderr
    assert "Traceback" not in proc.stderr and "stage        seconds" not in proc.stdout


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two teachers' state dicts as their owners would have them: a safetensors file and a .pt file."""
    root = tmp_path_factory.mktemp("own-weights")
    a = train(fauna_net(3, input_shape=SHAPE, mean=[0.5] * 3, std=[0.25] * 3), [0, 1, 2])
    b_spec = {"arch": "vgg", "width": 0.125, "blocks": 3, "num_outputs": 3, "input_shape": list(SHAPE)}
    b = train(build_model(b_spec, mean=[0.5] * 3, std=[0.25] * 3), [3, 4, 5])
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(root / "fauna-a.safetensors"))
    torch.save(b.state_dict(), root / "fauna-b.pt")
    return {"a": root / "fauna-a.safetensors", "b": root / "fauna-b.pt"}


def own_env() -> dict[str, str]:
    return {**os.environ, "DFKA_ARCH_MODULES": "tests", "PYTHONPATH": str(REPO)}


def bucket() -> str:
    return "s3://" + os.environ.get("DFKA_BUCKET", "dfka")


def pack(
    weights: Path, arch: str, labels: list[str], out: str, *extra: str, env=None
) -> subprocess.CompletedProcess:
    """``dfka teachers pack`` with the inputs every teacher here shares (32x32 RGB, one normalisation)."""
    return dfka(
        "teachers",
        "pack",
        "--arch",
        arch,
        "--weights",
        str(weights),
        "--labels",
        ",".join(labels),
        "--input-shape",
        "3,32,32",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.25,0.25,0.25",
        "--name",
        out.rsplit("/", 1)[-1],
        "--out",
        out,
        *extra,
        env=env or own_env(),
        cwd=REPO,
    )


def pack_both(weights: dict[str, Path], prefix: str) -> tuple[str, str]:
    a_uri, b_uri = f"{prefix}/fauna-a", f"{prefix}/fauna-b"
    for proc in (
        pack(weights["a"], FACTORY, LABELS_A, a_uri),
        pack(weights["b"], VGG, LABELS_B, b_uri, "--trust-pickle"),
    ):
        assert proc.returncode == 0, proc.stderr
    return a_uri, b_uri


def amalgamate(
    teachers: tuple[str, str], test_set: str, out: Path, config: Path
) -> subprocess.CompletedProcess:
    config.write_text(yaml.safe_dump(METHOD))
    return dfka(
        "amalgamate",
        "--teachers",
        *teachers,
        "--student",
        "vgg:0.125",
        "--config",
        str(config),
        "--eval-dataset",
        test_set,
        "--out",
        str(out),
        env=own_env(),
        cwd=REPO,
    )


@pytest.mark.integration
def test_own_teachers_and_test_set_through_the_cli(stack_env, weights, tmp_path: Path) -> None:
    # a pickle only with the owner's explicit trust
    one_error(
        pack(weights["b"], VGG, LABELS_B, f"{bucket()}/own/refused"),
        "does not unpickle files it is not told to trust",
    )
    a_uri, b_uri = pack_both(weights, f"{bucket()}/own/teachers")
    shown = dfka("teachers", "show", a_uri, env=own_env(), cwd=REPO)
    assert shown.returncode == 0, shown.stderr
    manifest = json.loads(shown.stdout[: shown.stdout.rindex("}") + 1])
    assert manifest["arch"]["arch"] == FACTORY and manifest["labels"] == LABELS_A
    assert manifest["level_shapes"] == [[3, 32, 32], [8, 16, 16], [16, 8, 8], [16]]

    write_test_set(tmp_path / "fauna-test", LABELS_A + LABELS_B)
    test_uri = f"{bucket()}/own/testsets/fauna"
    storage.put_dir(tmp_path / "fauna-test", test_uri)
    run = amalgamate((a_uri, b_uri), test_uri, tmp_path / "targetnet", tmp_path / "method.yaml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"test set: {test_uri}: 48 images of 6 labels" in run.stdout
    metrics = {
        line.split()[0]: float(line.split()[1])
        for line in run.stdout.splitlines()
        if line.split() and line.split()[0].startswith("test.")
    }
    # the student is three steps old, so only the wiring is checked: each label folder reached the right
    # output (the teachers are near-perfect on their own labels), and every metric was computed
    assert metrics["test.teacher.fauna-a.acc"] > 0.9 and metrics["test.teacher.fauna-b.acc"] > 0.9, metrics
    wanted = {"test.student.acc", "test.ensemble.acc", "test.student.task.fauna-a.acc"}
    assert wanted | {"test.ensemble.task.fauna-b.acc"} <= set(metrics)
    assert (tmp_path / "targetnet" / "targetnet.json").is_file()


@pytest.mark.integration
def test_hostile_inputs_on_the_own_teacher_paths(stack_env, weights, tmp_path: Path) -> None:
    root = f"{bucket()}/hostile"
    one_error(
        pack(weights["a"], f"{__name__}:broken_net", LABELS_A, f"{root}/x"),
        "RuntimeError: weights server unreachable",
    )
    # weights of width 1 under a manifest that says width 2: the shapes disagree
    one_error(pack(weights["a"], f"{FACTORY}:2", LABELS_A, f"{root}/wide"), "has shape")
    one_error(
        pack(weights["a"], FACTORY, ["../etc", "grey_wolf", "brown_bear"], f"{root}/path"),
        "unsafe label names ['../etc']",
    )
    outside = pack(
        weights["a"], FACTORY, LABELS_A, f"{root}/outside", env={**own_env(), "DFKA_ARCH_MODULES": ""}
    )
    one_error(outside, "not allowed to import")
    assert not storage.listdir(root)  # nothing was written by any refused pack

    teachers = pack_both(weights, f"{root}/teachers")
    from PIL import Image

    def broken(kind: str) -> Path:
        folder = tmp_path / kind
        write_test_set(folder, [*LABELS_A, *LABELS_B, *(["snow_owl"] if kind == "unknown" else [])])
        if kind == "corrupt":
            png = folder / "tree_frog" / "003.png"
            png.write_bytes(png.read_bytes()[:200])  # cut off mid-file
        if kind == "small":
            Image.new("RGB", (28, 28)).save(folder / "red_fox" / "big.png")
        storage.put_dir(folder, f"{root}/testsets/{kind}")
        return folder

    for kind, problem in [
        ("unknown", "labels the TargetNet does not predict: snow_owl"),
        ("corrupt", "tree_frog/003.png is not a readable image"),
        ("small", "red_fox/big.png is 28x28; the teachers take 32x32"),
    ]:
        broken(kind)
        run = amalgamate(
            teachers, f"{root}/testsets/{kind}", tmp_path / f"out-{kind}", tmp_path / "method.yaml"
        )
        one_error(run, problem)
    assert not list(tmp_path.glob("out-*/targetnet.json"))  # no run got as far as writing a TargetNet
