"""Teacher bundles: bit-exact round trips, and every way a bundle can be wrong gets a clear error."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfka.bundles import MANIFEST_NAME, WEIGHTS_NAME, load_bundle, save_bundle, sha256_file
from dfka.errors import BundleError
from dfka.models import build_model

LABELS = ["digit_0", "digit_1", "digit_2"]


def toy_model(width: float = 0.5):
    model = build_model(
        {"arch": "lenet5", "width": width, "blocks": 3, "num_outputs": 3, "input_shape": [1, 28, 28]},
        mean=[0.13],
        std=[0.31],
    )
    # non-trivial BN statistics so the round trip covers buffers too
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 28, 28))
    return model.eval()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "teacher"
    save_bundle(
        toy_model(), str(out), name="toy", labels=LABELS, task="multiclass", metrics={"test_acc": 0.9}
    )
    return out


def test_round_trip_is_bit_exact(bundle: Path) -> None:
    original = load_file(str(bundle / WEIGHTS_NAME))
    loaded = load_bundle(bundle)
    assert loaded.name == "toy" and loaded.labels == LABELS and loaded.task == "multiclass"
    state = loaded.model.state_dict()
    assert set(state) == set(original)
    for key, tensor in original.items():
        assert torch.equal(state[key], tensor), key
    assert loaded.model.normalization == {"mean": [pytest.approx(0.13)], "std": [pytest.approx(0.31)]}
    x = torch.rand(4, 1, 28, 28)
    model = toy_model()
    model.load_state_dict(original)
    assert torch.equal(loaded.model(x), model.eval()(x))
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    assert manifest["weights"]["sha256"] == sha256_file(bundle / WEIGHTS_NAME)
    assert manifest["block_count"] == 3 and "test_acc" in manifest["metrics"]


class Evil:
    """Unpickling this creates a file: proof that a loader executed code from the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "teacher.pt"
    evil.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(BundleError, match="never unpickles"):
        load_bundle(evil)
    # a directory holding only the pickle is refused the same way
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "model.pth").write_bytes(evil.read_bytes())
    with pytest.raises(BundleError, match=r"model\.pth.*never unpickles"):
        load_bundle(folder)
    # and a pickle disguised as the weights file is not safetensors: rejected without executing it
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / WEIGHTS_NAME).write_bytes(evil.read_bytes())
    _write_manifest_for(disguised)
    with pytest.raises(BundleError):
        load_bundle(disguised)
    assert not marker.exists()
    # sanity: the payload really does create the file when unpickled
    pickle.loads(evil.read_bytes())
    assert marker.exists()


def _write_manifest_for(folder: Path) -> None:
    """A manifest whose sha and size match whatever is in the weights file."""
    ref = toy_model()
    manifest = {
        "name": "x",
        "arch": ref.spec,
        "block_count": 3,
        "level_shapes": [list(s) for s in ref.level_shapes()],
        "input": {"shape": [1, 28, 28], "mean": [0.13], "std": [0.31]},
        "labels": LABELS,
        "task": "multiclass",
        "weights": {
            "sha256": sha256_file(folder / WEIGHTS_NAME),
            "bytes": (folder / WEIGHTS_NAME).stat().st_size,
        },
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def _edit_manifest(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = json.loads((path / MANIFEST_NAME).read_text())
        fn(data)
        (path / MANIFEST_NAME).write_text(json.dumps(data))

    return apply


def _rewrite_weights(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Change the weights and re-seal the manifest (so only the semantic check can catch it)."""

    def apply(path: Path) -> None:
        state = load_file(str(path / WEIGHTS_NAME))
        fn(state)
        save_file(state, str(path / WEIGHTS_NAME))
        data = json.loads((path / MANIFEST_NAME).read_text())
        data["weights"]["sha256"] = sha256_file(path / WEIGHTS_NAME)
        data["weights"]["bytes"] = (path / WEIGHTS_NAME).stat().st_size
        (path / MANIFEST_NAME).write_text(json.dumps(data))

    return apply


def _flip_byte(path: Path) -> None:
    data = bytearray((path / WEIGHTS_NAME).read_bytes())
    data[-10] ^= 0xFF
    (path / WEIGHTS_NAME).write_bytes(bytes(data))


def _set(key: str, value: object) -> Callable[[dict], None]:
    def fn(d: dict) -> None:
        d[key] = value

    return fn


BAD_BUNDLES: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing manifest", lambda p: (p / MANIFEST_NAME).unlink(), "has no teacher.json"),
    ("missing weights", lambda p: (p / WEIGHTS_NAME).unlink(), "has no weights.safetensors"),
    ("tampered weights", _flip_byte, "sha256 .* does not match"),
    (
        "truncated weights",
        lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:100]),
        "truncated or replaced",
    ),
    ("manifest not json", lambda p: (p / MANIFEST_NAME).write_text("{not json"), "not valid JSON"),
    ("oversized manifest", lambda p: (p / MANIFEST_NAME).write_text(" " * (2 << 20)), "larger than"),
    ("unknown manifest key", _edit_manifest(_set("colour", "blue")), "colour.*Extra inputs"),
    ("wrong format version", _edit_manifest(_set("format", "dfka.teacher/v9")), "this dfka reads"),
    ("unknown task", _edit_manifest(_set("task", "regression")), "task"),
    ("duplicate labels", _edit_manifest(_set("labels", ["a", "a", "b"])), "duplicate label"),
    ("wrong label count", _edit_manifest(_set("labels", ["a", "b"])), "2 labels for 3 outputs"),
    (
        "unknown architecture",
        _edit_manifest(lambda d: d["arch"].update(arch="alexnet")),
        "unknown architecture 'alexnet'",
    ),
    ("arch width mismatch", _edit_manifest(lambda d: d["arch"].update(width=1.0)), "level shapes"),
    ("input shape mismatch", _edit_manifest(lambda d: d["input"].update(shape=[3, 28, 28])), "input shape"),
    ("negative std", _edit_manifest(lambda d: d["input"].update(std=[-1.0])), "std"),
    ("bad sha field", _edit_manifest(lambda d: d["weights"].update(sha256="abc")), "sha256"),
    ("nan weights", _rewrite_weights(lambda s: s["head.weight"].fill_(float("nan"))), "NaN or Inf"),
    ("inf weights", _rewrite_weights(lambda s: s["head.bias"].fill_(float("inf"))), "NaN or Inf"),
    ("missing tensor", _rewrite_weights(lambda s: s.pop("head.bias")), "missing \\['head.bias'\\]"),
    ("extra tensor", _rewrite_weights(lambda s: s.update(extra=torch.zeros(1))), "unexpected \\['extra'\\]"),
    (
        "tensor shape mismatch",
        _rewrite_weights(lambda s: s.update({"head.bias": torch.zeros(7)})),
        "head.bias has shape",
    ),
]


@pytest.mark.parametrize(("case", "damage", "message"), BAD_BUNDLES, ids=[c[0] for c in BAD_BUNDLES])
def test_bad_bundles_are_rejected_with_a_fix(bundle: Path, case: str, damage, message: str) -> None:
    damage(bundle)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(bundle)
    assert info.value.problem  # every error names the problem; most also name a fix
    assert "Traceback" not in str(info.value)


def test_nonexistent_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


def test_label_count_must_match_on_save(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="2 label names for a model with 3 outputs"):
        save_bundle(toy_model(), str(tmp_path / "t"), name="t", labels=["a", "b"], task="multiclass")
