"""The stage images (images/stage*.Dockerfile) install exactly the project's pins. No Docker engine here:
the Dockerfiles are parsed as text and held to pyproject.toml, constraints.txt and the pipeline."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from dfka import __version__
from dfka.ops.placement import DEFAULT_CPU_PLACEMENT, DEFAULT_GPU_PLACEMENT
from dfka.pipeline_config import STAGE_CPU_IMAGE, STAGE_IMAGE

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "images" / "stage.Dockerfile"
CPU = ROOT / "images" / "stage-cpu.Dockerfile"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if (m := PIN.match(line.strip())) is not None:
            pins[norm(m.group(1))] = m.group(3)
    return pins


def project_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for dep in project["dependencies"]:
        m = PIN.match(dep.replace(" ", ""))
        assert m, f"pyproject dependency {dep!r} is not an exact pin"
        pins[norm(m.group(1))] = m.group(3)
    return pins


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def args_of(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions(path) if k == "ARG" and "=" in a)


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for keyword, args in instructions(path):
        if keyword == "ENV":
            env.update(t.split("=", 1) for t in shlex.split(args))
    return env


def pip_installs(path: Path) -> list[list[str]]:
    """Each ``pip install`` command of the RUN lines, as shell words."""
    commands = []
    for keyword, args in instructions(path):
        if keyword != "RUN":
            continue
        group: list[str] = []
        for word in [*shlex.split(args), "&&"]:
            if word in ("&&", "||", ";"):
                if "pip" in group and "install" in group:
                    commands.append(group[group.index("install") + 1 :])
                group = []
            else:
                group.append(word)
    return commands


def from_image(path: Path) -> str:
    (image,) = [a for k, a in instructions(path) if k == "FROM"]
    for name, value in args_of(path).items():
        image = image.replace(f"${{{name}}}", value)
    return image


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_pinned_requirements_match_the_lock(path: Path) -> None:
    lock, project = constraints(), project_pins()
    pinned = 0
    for words in pip_installs(path):
        for word in words:
            if (m := PIN.match(word)) is not None:
                name, version = norm(m.group(1)), m.group(3)
                assert lock.get(name) == version, (
                    f"{path.name}: {word} but constraints.txt has {lock.get(name)}"
                )
                if name in project:
                    assert project[name] == version, (
                        f"{path.name}: {word} but pyproject.toml pins {project[name]}"
                    )
                pinned += 1
    assert pinned >= 2
    installed = " ".join(w for words in pip_installs(path) for w in words)
    assert "kfp==" in installed and "kfp-kubernetes==" in installed  # preinstalled: install_kfp_package=False


@pytest.mark.parametrize("path", [GPU, CPU], ids=["gpu", "cpu"])
def test_the_project_installs_from_the_lock_minus_torch(path: Path) -> None:
    runs = " ".join(a for k, a in instructions(path) if k == "RUN")
    derived = re.search(r"grep -v '\^torch==' constraints\.txt > (\S+)", runs)
    assert derived, "the image must install from constraints.txt with only the torch line removed"
    for words in pip_installs(path):
        if "." in words:  # the dfka project itself
            assert words[words.index("-c") + 1] == derived.group(1)
    copied = " ".join(a for k, a in instructions(path) if k == "COPY")
    assert "constraints.txt" in copied and "pyproject.toml" in copied


def test_gpu_base_brings_the_pinned_torch() -> None:
    image = from_image(GPU)
    repo, _, tag = image.partition(":")
    assert repo == "pytorch/pytorch" and "cuda" in tag and "runtime" in tag
    assert tag.split("-")[0] == project_pins()["torch"]


def test_cpu_base_is_python_311_with_the_cpu_wheel() -> None:
    image = from_image(CPU)
    assert re.fullmatch(r"python:3\.11\.\d+-slim", image), image
    torch = [w for words in pip_installs(CPU) if "--index-url" in words for w in words]
    assert "https://download.pytorch.org/whl/cpu" in torch and f"torch=={project_pins()['torch']}" in torch


@pytest.mark.parametrize(
    ("path", "threads"),
    [(GPU, DEFAULT_GPU_PLACEMENT.cpu_request), (CPU, DEFAULT_CPU_PLACEMENT.cpu_limit)],
    ids=["gpu", "cpu"],
)
def test_runtime_settings(path: Path, threads: str) -> None:
    env = env_of(path)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["OMP_NUM_THREADS"] == threads  # as many threads as the stage's CPUs (dfka.ops.placement)
    (user,) = [a for k, a in instructions(path) if k == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes can verify runAsNonRoot
    (health,) = [a for k, a in instructions(path) if k == "HEALTHCHECK"]
    assert "import dfka, kfp" in health
    assert ":latest" not in path.read_text()


def test_pipeline_uses_these_images() -> None:
    assert STAGE_IMAGE.endswith(f":{__version__}") and STAGE_CPU_IMAGE.endswith(f":{__version__}-cpu")
    assert f"-t {STAGE_IMAGE} ." in GPU.read_text()
    assert f"-t {STAGE_CPU_IMAGE} ." in CPU.read_text()
