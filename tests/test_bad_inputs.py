"""Bad input fails before any training, with an error that names the problem and the fix (issue #7, part 2).

One table: each row damages a valid experiment (its config, its label request or its teacher bundles)
and names the error class and text that the pre-flight check (``dfka.stages.ingest.preflight``, what
``dfka pipeline run`` and the ingest stage run) must give. Then the real CLI, in subprocesses, prints
such errors as ``error: ...`` + ``fix: ...`` with no traceback.

Single-bundle damage is covered bundle by bundle in ``tests/test_bundles.py`` (21 cases, malicious
pickle included); here bundles are damaged inside a whole experiment.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dfka.bundles import MANIFEST_NAME, WEIGHTS_NAME, save_bundle, sha256_file
from dfka.errors import BundleError, CompatibilityError, ConfigError, DataError, DfkaError, LabelError
from dfka.pipeline_config import ExperimentConfig
from dfka.stages.ingest import preflight
from tests.test_bundles import Evil, toy_model
from tests.toys import toy_teacher

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [f"digit_{i}" for i in range(8)]
METHOD = {
    "student": "lenet5:0.5",
    "device": "cpu",
    "gan": {"batch_size": 16, "budget": {"steps": 2}, "widths": 8},
    "export": {"samples": 64, "shard_size": 64},
    "blocks": {"batch_size": 16, "budget": {"steps": 3}},
    "regroup": {"batch_size": 16},
}


def _save(bundle, path: Path) -> str:
    save_bundle(bundle.model, path, name=bundle.name, labels=bundle.labels, task=bundle.task)
    return str(path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two compatible toy teachers (12x12 inputs, 3 blocks) owning digit_0..3 and digit_4..7."""
    root = tmp_path_factory.mktemp("pristine")
    _save(toy_teacher([0, 1, 2, 3], name="a", seed=1, steps=5, labels=DIGITS[:4]), root / "a")
    _save(toy_teacher([4, 5, 6, 7], name="b", seed=2, steps=5, labels=DIGITS[4:]), root / "b")
    return root


@dataclass
class Case:
    id: str
    damage: Callable[[dict[str, Any], Path], None]  # edits the raw config and/or the bundles under Path
    error: type[DfkaError]
    text: str  # a regex the error's problem must match


def _set(path: str, value: Any) -> Callable[[dict[str, Any], Path], None]:
    """Set a dotted key of the raw config, e.g. ``amalgamation.gan.budget.steps``."""

    def apply(raw: dict[str, Any], _: Path) -> None:
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return apply


def _edit_manifest(name: str, fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any], Path], None]:
    def apply(_: dict[str, Any], root: Path) -> None:
        path = root / name / MANIFEST_NAME
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return apply


def _nan_weights(_: dict[str, Any], root: Path) -> None:
    """NaN in the weights, with a re-sealed manifest (sha256 and size match): only the value check sees it."""
    weights = root / "b" / WEIGHTS_NAME
    state = load_file(str(weights))
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    save_file(state, str(weights))
    data = json.loads((root / "b" / MANIFEST_NAME).read_text())
    data["weights"].update(sha256=sha256_file(weights), bytes=weights.stat().st_size)
    (root / "b" / MANIFEST_NAME).write_text(json.dumps(data))


def _flip_byte(_: dict[str, Any], root: Path) -> None:
    weights = root / "a" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))


def _truncate(_: dict[str, Any], root: Path) -> None:
    weights = root / "a" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])


def _oversize(_: dict[str, Any], root: Path) -> None:
    """A 4 GiB + 1 byte weights file, sparse: refused by its size before a byte of it is read."""
    with (root / "a" / WEIGHTS_NAME).open("r+b") as fh:
        fh.truncate((4 << 30) + 1)


def _replace_teacher(**kwargs: Any) -> Callable[[dict[str, Any], Path], None]:
    """Swap teacher b for one built with other options (blocks, arch, ...)."""

    def apply(raw: dict[str, Any], root: Path) -> None:
        shutil.rmtree(root / "b")
        _save(toy_teacher([4, 5], name="b", steps=1, labels=DIGITS[4:6], **kwargs), root / "b")

    return apply


def _four_block_families(raw: dict[str, Any], root: Path) -> None:
    for name, arch, classes in (("a", "lenet5", [0, 1]), ("b", "resnet", [2, 3])):
        shutil.rmtree(root / name)
        labels = [DIGITS[c] for c in classes]
        _save(toy_teacher(classes, name=name, arch=arch, blocks=4, steps=1, labels=labels), root / name)


def _bigger_input(raw: dict[str, Any], root: Path) -> None:
    shutil.rmtree(root / "b")  # a 28x28 LeNet next to the 12x12 teacher a
    save_bundle(toy_model(), root / "b", name="b", labels=DIGITS[4:7], task="multiclass")


def _pickle_teacher(raw: dict[str, Any], root: Path) -> None:
    (root / "b.pt").write_bytes(pickle.dumps(Evil(root / "pwned")))
    raw["teachers"][1] = str(root / "b.pt")


def _own_test_set(extra_label: str | None = None, size: int = 12) -> Callable[[dict[str, Any], Path], None]:
    """evaluation.dataset: a folder test set (LABEL/IMAGE.png) with one thing wrong."""

    def apply(raw: dict[str, Any], root: Path) -> None:
        from PIL import Image

        folder = root / "own-test-set"
        for label in [*DIGITS[:8], *([extra_label] if extra_label else [])]:
            (folder / label).mkdir(parents=True)
            Image.new("L", (size, size)).save(folder / label / "0.png")
        raw["evaluation"] = {"dataset": str(folder)}

    return apply


def _same_name(raw: dict[str, Any], root: Path) -> None:
    _edit_manifest("b", lambda d: d.update(name="a"))(raw, root)


CASES: list[Case] = [
    # -- experiment config: unknown keys, wrong types, impossible values
    Case("unknown top-level key", _set("experimnt", "x"), ConfigError, r"experimnt: Extra inputs are not permitted"),
    Case("unknown nested key", _set("amalgamation.gan.lrr", 0.1), ConfigError, r"amalgamation\.gan\.lrr: Extra inputs"),
    Case("wrong type", _set("amalgamation.gan.batch_size", "big"), ConfigError, r"gan\.batch_size: Input should be a valid integer"),
    Case("teachers not a list", _set("teachers", "s3://dfka/t"), ConfigError, r"teachers: Input should be a valid list"),
    Case("negative step budget", _set("amalgamation.gan.budget.steps", -5), ConfigError, r"gan\.budget\.steps: Input should be greater than or equal to 1"),
    Case("negative time budget", _set("amalgamation.budget_minutes", -1), ConfigError, r"budget_minutes: Input should be greater than 0"),
    Case("steps and seconds", _set("amalgamation.blocks.budget", {"steps": 5, "seconds": 3}), ConfigError, r"give steps or seconds, not both"),
    Case("zero samples", _set("amalgamation.export.samples", 0), ConfigError, r"export\.samples: Input should be greater than or equal to 1"),
    Case("unknown union rule", _set("amalgamation.union.rule", "max"), ConfigError, r"union\.rule: Input should be 'logits' or 'softmax'"),
    Case("zero threads", _set("pipeline.threads", 0), ConfigError, r"pipeline\.threads: Input should be greater than or equal to 1"),
    Case("negative checkpoint interval", _set("pipeline.checkpoint_every", -1), ConfigError, r"pipeline\.checkpoint_every"),
    Case("local pipeline root", _set("pipeline.pipeline_root", "/tmp/x"), ConfigError, r"pipeline_root must be an object-store URI"),
    Case("unknown student arch", _set("amalgamation.student", "alexnet:1"), ConfigError, r"amalgamation\.student 'alexnet:1': unknown architecture 'alexnet'"),
    Case("student with other blocks", _set("amalgamation.student", "lenet5:0.5:blocks=2"), CompatibilityError, r"student has 2 blocks, teachers have 3"),
    Case("widths of wrong length", _set("amalgamation.gan.widths", [8, 8]), ConfigError, r"gan\.widths lists 2 widths but the teachers have 3 blocks"),
    Case("block weights of wrong length", _set("amalgamation.blocks.block_weights", [1, 1]), ConfigError, r"block_weights lists 2 shares but the teachers have 3 blocks"),
    Case("zero block weight", _set("amalgamation.blocks.block_weights", [1, 0, 1]), ConfigError, r"has a share <= 0"),
    Case("lambda for no teacher", _set("amalgamation.blocks.lambda_teachers", {"c": 2.0}), ConfigError, r"lambda_teachers names \['c'\]"),
    Case("fewer samples than a batch", _set("amalgamation.export.samples", 8), ConfigError, r"export\.samples \(8\) is smaller than blocks\.batch_size \(16\)"),
    Case("unknown device", _set("amalgamation.device", "tpu"), ConfigError, r"device 'tpu' is not a device"),
    Case("unknown evaluation dataset", _set("evaluation.dataset", "cifar"), ConfigError, r"unknown dataset 'cifar'"),
    Case("own test set with an unknown label", _own_test_set("digit_9"), DataError, r"labels the TargetNet does not predict: digit_9"),
    Case("own test set of the wrong size", _own_test_set(size=28), DataError, r"0\.png is 28x28; the teachers take 12x12"),
    Case("own test set that is empty", _set("evaluation.dataset", "/nonexistent/test-set"), DataError, r"holds no files \(or does not exist\)"),
    # -- label requests
    Case("empty target set", _set("target_labels", []), ConfigError, r"target label set is empty; omit target_labels"),
    Case("empty inner target set", _set("amalgamation.target_labels", []), ConfigError, r"amalgamation\.target_labels is empty"),
    Case("unknown label", _set("target_labels", "digit_1,digt_3"), LabelError, r"'digt_3' is not a label of any teacher"),
    Case("duplicate label", _set("target_labels", "digit_1, Digit_1"), LabelError, r"name digit_1 more than once"),
    Case("overlapping ranges", _set("target_labels", "digit_0..digit_3,digit_2"), LabelError, r"name digit_2 more than once"),
    Case("reversed range", _set("target_labels", "digit_5..digit_2"), LabelError, r"is reversed \(digit_5 comes after digit_2\)"),
    Case("label no teacher owns", _set("target_labels", "digit_0..digit_9"), LabelError, r"\['digit_8', 'digit_9'\] are not owned by any teacher"),
    # -- teacher bundles and teacher sets
    Case("one teacher", _set("teachers", ["x", "y", "z"][:1]), ConfigError, r"teachers: List should have at least 2 items"),
    Case("missing bundle", _set("teachers", ["/nonexistent/a", "/nonexistent/b"]), BundleError, r"teacher bundle /nonexistent/a not found"),
    Case("missing weights", lambda raw, root: (root / "a" / WEIGHTS_NAME).unlink(), BundleError, r"has no weights\.safetensors"),
    Case("sha mismatch", _flip_byte, BundleError, r"sha256 .* does not match the manifest"),
    Case("shapes do not match the manifest", _edit_manifest("a", lambda d: d["arch"].update(width=1.0)), BundleError, r"level shapes .* do not match"),
    Case("NaN weights", _nan_weights, BundleError, r"tensor head\.weight contains NaN or Inf"),
    Case("truncated weights", _truncate, BundleError, r"is \d+ bytes but the manifest says \d+ \(truncated or replaced\)"),
    Case("oversized weights", _oversize, BundleError, r"over the 4294967296-byte limit"),
    Case("unknown architecture", _edit_manifest("b", lambda d: d["arch"].update(arch="alexnet")), BundleError, r"unknown architecture 'alexnet'"),
    Case("malicious pickle", _pickle_teacher, BundleError, r"looks like a pickled PyTorch checkpoint; dfka never unpickles"),
    Case("incompatible block counts", _replace_teacher(blocks=2), CompatibilityError, r"teacher b has 2 blocks but a has 3"),
    Case("incompatible block levels", _four_block_families, CompatibilityError, r"level 3 differs"),
    Case("mismatched input size", _bigger_input, CompatibilityError, r"teacher b takes input \(1, 28, 28\) but a takes \(1, 12, 12\)"),
    Case("mismatched pixel range", _edit_manifest("b", lambda d: d["input"].update(pixel_range=[0, 255])), CompatibilityError, r"teacher b expects pixels in \[0\.0, 255\.0\]"),
    Case("two teachers one name", _same_name, CompatibilityError, r"two teachers share the name\(s\) \['a'\]"),
]  # fmt: skip


def _raw(root: Path) -> dict[str, Any]:
    return {
        "experiment": "dfka-bad-inputs",
        "teachers": [str(root / "a"), str(root / "b")],
        "amalgamation": copy.deepcopy(METHOD),
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_training(case: Case, pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    shutil.copytree(pristine, root)
    raw = _raw(root)
    case.damage(raw, root)
    with pytest.raises(DfkaError) as info:
        preflight(ExperimentConfig.parse(raw))
    err = info.value
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    assert err.problem and re.search(case.text, err.problem), err.problem
    assert err.fix, f"no fix for: {err.problem}"  # every error says what to do
    assert "Traceback" not in str(err)
    assert not (root / "pwned").exists()  # nothing was unpickled


def test_the_undamaged_experiment_passes(pristine: Path) -> None:
    raw = {**_raw(pristine), "target_labels": "digit_3, digit_0..digit_2, digit_6"}
    checked = preflight(ExperimentConfig.parse(raw))
    assert checked.cfg.target_labels == ["digit_3", "digit_0", "digit_1", "digit_2", "digit_6"]
    assert checked.teacher_set.names == ["a", "b"]


def test_config_file_that_is_not_yaml(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("teachers: [a, b\namalgamation: {")
    with pytest.raises(ConfigError, match="is not valid YAML") as info:
        ExperimentConfig.load(tmp_path / "bad.yaml")
    assert info.value.fix == "fix the syntax"


def test_unknown_label_suggests_the_closest(pristine: Path) -> None:
    with pytest.raises(LabelError) as info:
        preflight(ExperimentConfig.parse({**_raw(pristine), "target_labels": "digt_3"}))
    assert info.value.fix.startswith("did you mean digit_3?")


# ---------------------------------------------------------------- the real CLI


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dfka.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.integration
def test_cli_prints_one_error_with_a_fix_and_no_traceback(stack_env, pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "bundles"
    shutil.copytree(pristine, root)
    typo = _raw(root) | {"amalgamation": {**METHOD, "gan": {**METHOD["gan"], "lrr": 1}}}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    nan = tmp_path / "nan"
    shutil.copytree(pristine, nan)
    _nan_weights({}, nan)
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(_raw(nan)))
    labels = _raw(root) | {"target_labels": "digit_1,digt_3"}
    (tmp_path / "labels.yaml").write_text(yaml.safe_dump(labels))
    tampered = tmp_path / "tampered"
    shutil.copytree(pristine, tampered)
    _flip_byte({}, tampered)

    runs = {  # started together: each pays the interpreter and import start-up, not each other's
        "typo": _cli("pipeline", "run", "--config", str(tmp_path / "typo.yaml"), cwd=tmp_path),
        "nan": _cli("pipeline", "run", "--config", str(tmp_path / "nan.yaml"), cwd=tmp_path),
        "labels": _cli("pipeline", "run", "--config", str(tmp_path / "labels.yaml"), cwd=tmp_path),
        "show": _cli("teachers", "show", str(tampered / "a"), cwd=tmp_path),
        "amalgamate": _cli(
            "amalgamate", "--teachers", *_raw(nan)["teachers"], "--out", str(tmp_path / "o"), cwd=tmp_path
        ),
        "seeds": _cli("bench", "run", "digits", "--seeds", "0,x", "--no-mlflow", cwd=tmp_path),
        "scaling": _cli("bench", "scaling", "--teachers", "1,2", "--out", str(tmp_path / "s"), cwd=tmp_path),
    }
    expected = {
        "typo": r"error: .*typo\.yaml is invalid: amalgamation\.gan\.lrr: Extra inputs are not permitted",
        "nan": r"error: .*/nan/b: tensor head\.weight contains NaN or Inf",
        "labels": r"error: target label 'digt_3' is not a label of any teacher",
        "show": r"error: .*/a/weights\.safetensors sha256 .* does not match the manifest",
        "amalgamate": r"error: .*/nan/b: tensor head\.weight contains NaN or Inf",
        "seeds": r"error: 'x' in '0,x' is not a whole number",
        "scaling": r"error: scaling: teachers = 1 cannot be measured",
    }
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, f"{name}: {out}\n{err}"
        assert "Traceback" not in out + err, f"{name}: {err}"
        lines = [line for line in err.splitlines() if line.startswith(("error:", "  fix:"))]
        assert len(lines) == 2, f"{name}: {err}"
        assert re.match(expected[name], lines[0]), f"{name}: {lines[0]}"
        assert lines[1].startswith("  fix: ") and len(lines[1]) > 12
        assert "dfka pipeline: run" not in out  # refused before any stage started


# ---------------------------------------------------------------- hostile inputs at the CLI (issue #15)

BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    + "target_labels: *i\n"
)


def _reseal(bundle: Path) -> None:
    weights = bundle / WEIGHTS_NAME
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    data["weights"].update(sha256=sha256_file(weights), bytes=weights.stat().st_size)
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def _manifest(key: str, value: Any) -> Callable[[Path], None]:
    def apply(bundle: Path) -> None:
        data = json.loads((bundle / MANIFEST_NAME).read_text())
        node = data
        *parents, last = key.split(".")
        for k in parents:
            node = node[k]
        node[last] = value
        (bundle / MANIFEST_NAME).write_text(json.dumps(data))

    return apply


def _deep_manifest(bundle: Path) -> None:
    (bundle / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)


def _negative_bn_variance(bundle: Path) -> None:
    state = load_file(str(bundle / WEIGHTS_NAME))
    key = next(k for k in state if k.endswith("running_var"))
    state[key] = -state[key].abs() - 1
    save_file(state, str(bundle / WEIGHTS_NAME))
    _reseal(bundle)


@dataclass
class CliCase:
    id: str
    args: Callable[[Path, list[str]], list[str]]  # (tmp dir, the two teacher dirs) -> dfka arguments
    text: str  # a regex the `error:` line must match
    damage: Callable[[Path], None] | None = None  # applied to teacher a's bundle


def _amalgamate(*extra: str, config: str | bytes | None = None) -> Callable[[Path, list[str]], list[str]]:
    def args(tmp: Path, teachers: list[str]) -> list[str]:
        out = ["amalgamate", "--teachers", *teachers, "--eval-dataset", "mnist", "--budget-minutes", "0.05"]
        if config is not None:
            path = tmp / "config.yaml"
            path.write_bytes(config) if isinstance(config, bytes) else path.write_text(config)
            out += ["--config", str(path)]
        extra_args = [a.replace("{tmp}", str(tmp)) for a in extra]
        return out + (extra_args if "--out" in extra else [*extra_args, "--out", str(tmp / "out")])

    return args


def _file(name: str, text: str, *command: str) -> Callable[[Path, list[str]], list[str]]:
    def args(tmp: Path, _: list[str]) -> list[str]:
        (tmp / name).write_text(text)
        return [a.replace("{file}", str(tmp / name)) for a in command]

    return args


CLI_CASES = [
    # numbers that must be finite, in range
    CliCase(
        "nan-loss-weight",
        _amalgamate(config="gan: {loss: {oh: .nan}}\n"),
        r"gan\.loss\.oh: Input should be a finite number",
    ),
    CliCase(
        "inf-learning-rate",
        _amalgamate(config="gan: {lr: .inf}\n"),
        r"gan\.lr: Input should be a finite number",
    ),
    CliCase(
        "inf-budget",
        _amalgamate("--budget-minutes", "inf"),
        r"budget_minutes: Input should be a finite number",
    ),
    CliCase("seed-beyond-63-bits", _amalgamate("--seed", str(2**70)), r"seed: Input should be less than"),
    # config files that are not a dfka config
    CliCase(
        "yaml-alias-bomb",
        _amalgamate(config=BOMB),
        r"expands to more than 100,000 values through its YAML aliases",
    ),
    CliCase("config-is-a-list", _amalgamate(config="- 1\n- 2\n"), r"holds a YAML list, not a mapping"),
    CliCase("config-is-a-string", _amalgamate(config="hello\n"), r"holds a YAML str, not a mapping"),
    CliCase("config-not-utf8", _amalgamate(config=b"\xff\xfe\x00bad"), r"is not UTF-8 text"),
    CliCase(
        "bad-teacher-zoo",
        _file(
            "zoo.yaml",
            "out: x\nteachers: [{name: a.b, dataset: mnist, labels: digit_0}]\n",
            "teachers",
            "zoo",
            "{file}",
        ),
        r"zoo\.yaml is invalid: teachers\.0\.name: String should match pattern",
    ),
    CliCase(
        "bench-yaml-bomb",
        _file("b.yaml", BOMB, "bench", "run", "{file}"),
        r"expands to more than 100,000 values",
    ),
    # teacher bundles: names, manifests, architectures, weights
    CliCase(
        "teacher-name-with-a-dot",
        _amalgamate(),
        r"teacher\.json is invalid: name: String should match",
        _manifest("name", "a.b"),
    ),
    CliCase(
        "path-like-teacher-name",
        _amalgamate(),
        r"teacher\.json is invalid: name: String should match",
        _manifest("name", "../x"),
    ),
    CliCase(
        "100000-deep-manifest", _amalgamate(), r"nested too deeply to be a teacher manifest", _deep_manifest
    ),
    CliCase(
        "huge-width",
        _amalgamate(),
        r"architecture field width=1000000\.0 is not a number in",
        _manifest("arch.width", 1e6),
    ),
    CliCase(
        "negative-width",
        _amalgamate(),
        r"architecture field width=-2 is not a number in",
        _manifest("arch.width", -2),
    ),
    CliCase(
        "width-of-wrong-type",
        _amalgamate(),
        r"architecture field width='wide' is not a number",
        _manifest("arch.width", "wide"),
    ),
    CliCase(
        "absurd-block-count",
        _amalgamate(),
        r"architecture field blocks=1000000000 is not an integer",
        _manifest("arch.blocks", 10**9),
    ),
    CliCase(
        "negative-bn-variance",
        _amalgamate(),
        r"running_var has negative running variances",
        _negative_bn_variance,
    ),
    # outputs checked before the training, not after it
    CliCase(
        "out-is-an-existing-file",
        _amalgamate("--out", "{tmp}/config.yaml", config="seed: 1\n"),
        r"--out .* is an existing file",
    ),
    # run ids become lock files and S3 prefixes
    CliCase(
        "path-like-run-id",
        lambda tmp, _: ["pipeline", "run", "--config", "configs/demo.yaml", "--run-id", "../../x"],
        r"run id '\.\./\.\./x' is not a safe name",
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_hostile_cli_input_gets_one_error_and_one_fix_before_any_work(
    case: CliCase,
    pristine: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dfka.cli import main

    monkeypatch.setenv("DFKA_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    teachers = [str(tmp_path / "a"), str(pristine / "b")]
    shutil.copytree(pristine / "a", teachers[0])
    if case.damage is not None:
        case.damage(Path(teachers[0]))
    started = time.perf_counter()
    code = main(case.args(tmp_path, teachers))
    err = capfd.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "  fix:"))]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("  fix: "), err
    assert re.search(case.text, lines[0]), lines[0]
    assert "Traceback" not in err
    assert time.perf_counter() - started < 20  # refused up front, not after a training
    assert not (tmp_path / "out" / "targetnet.json").exists()


def test_a_full_disk_is_one_error_with_a_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC from anywhere in a command (a full DFKA_HOME, a full --out disk) ends as error/fix, exit 2."""
    import errno

    import dfka.tracking
    from dfka.cli import main

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "/full/dfka-home/offline-runs/x.jsonl")

    monkeypatch.setattr(dfka.tracking, "pending_offline", full)
    assert main(["tracking", "status"]) == 2
    err = capsys.readouterr().err
    assert "error: No space left on device writing /full/dfka-home/offline-runs/x.jsonl" in err
    assert "fix: free space there" in err and "Traceback" not in err


def test_out_checks_writability_and_free_space_up_front(tmp_path: Path) -> None:
    from dfka.runtime import ensure_writable_dir

    assert ensure_writable_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert not list((tmp_path / "new" / "dir").iterdir())  # the probe file is gone
    with pytest.raises(ConfigError, match=r"MB free; the output needs about"):
        ensure_writable_dir(tmp_path, need_bytes=1 << 62)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is an existing file"):
        ensure_writable_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="is not writable"):
        ensure_writable_dir(tmp_path / "f" / "below")


def test_a_cut_off_offline_tracking_file_is_read_and_a_damaged_one_named(tmp_path: Path) -> None:
    from dfka.errors import StackError
    from dfka.tracking import OfflineRun

    cut = tmp_path / "cut.jsonl"
    cut.write_text(
        '{"kind": "run", "local_id": "x"}\n{"kind": "metric", "key": "a", "val'
    )  # killed mid-write
    assert [r["kind"] for r in OfflineRun.read(cut).records] == ["run"]
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text('{"kind": "run"}\n{"kind": \n{"kind": "end"}\n')
    with pytest.raises(StackError, match=r"damaged\.jsonl line 2 is damaged"):
        OfflineRun.read(damaged)
