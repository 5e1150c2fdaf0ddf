"""Multi-label mosaics: every tile is a real image of the right split, labels match the tiles, seeds reproduce."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dfka import data
from dfka.data import mosaic
from dfka.errors import ConfigError


def fashion_available() -> bool:
    """Mosaics need both MNIST and Fashion-MNIST; without Fashion this module is skipped."""
    return data.fashion_available()


pytestmark = [
    pytest.mark.fashion,
    pytest.mark.skipif(
        not fashion_available(),
        reason="mosaics need Fashion-MNIST: `sudo apt-get install dataset-fashion-mnist` or set DFKA_FASHION_DIR",
    ),
]


@pytest.fixture(autouse=True)
def _not_data_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFKA_DATA_FREE", raising=False)


@pytest.fixture(scope="module")
def tile_labels() -> dict[str, dict[bytes, int]]:
    """Per split: raw 784 bytes of every MNIST and Fashion image -> its label in ALL_LABELS order."""
    data.fetch_mnist()  # no-op when cached
    out: dict[str, dict[bytes, int]] = {}
    for split in ("train", "test"):
        table: dict[bytes, int] = {}
        for (x, y), offset in ((data.mnist_arrays(split), 0), (data.fashion_arrays(split), 10)):
            assert x.reshape(len(x), -1).max(axis=1).min() > 0  # no black image, so black == empty cell
            table.update(zip((row.tobytes() for row in x.reshape(len(x), -1)), (y + offset).tolist()))
        out[split] = table
    # no image occurs in both splits (so membership below really tells the splits apart)
    assert not out["train"].keys() & out["test"].keys()
    return out


def _check_tiles(mosaics: data.Mosaics, own: dict[bytes, int], other: dict[bytes, int]) -> None:
    tiles = mosaic.split_tiles(mosaics.images)
    empty = tiles.reshape(len(tiles), 4, -1).max(axis=2) == 0
    np.testing.assert_array_equal(empty, mosaics.sources < 0)
    expected = np.zeros_like(mosaics.targets)
    for i, cell in zip(*np.nonzero(~empty)):
        key = tiles[i, cell].tobytes()
        assert key in own, f"mosaic {i} cell {cell} is not a {mosaics.split} image"
        assert key not in other, f"mosaic {i} cell {cell} comes from the other split"
        expected[i, own[key]] = 1.0
    np.testing.assert_array_equal(mosaics.targets, expected)


def test_test_mosaics_use_only_test_images(tile_labels: dict[str, dict[bytes, int]]) -> None:
    test = data.build_mosaics("test")
    assert test.images.shape == (mosaic.TEST_SIZE, 56, 56) and test.images.dtype == np.uint8
    assert test.targets.shape == (mosaic.TEST_SIZE, 20) and test.targets.dtype == np.float32
    _check_tiles(test, tile_labels["test"], tile_labels["train"])


def test_train_mosaics_use_only_train_images(tile_labels: dict[str, dict[bytes, int]]) -> None:
    train = data.build_mosaics("train")
    assert len(train) == mosaic.TRAIN_SIZE
    sample = np.random.default_rng(0).choice(len(train), 5000, replace=False)
    subset = data.Mosaics(train.images[sample], train.targets[sample], train.sources[sample], "train", 0)
    _check_tiles(subset, tile_labels["train"], tile_labels["test"])


def test_sources_point_at_the_tiles() -> None:
    test = data.build_mosaics("test", n=200, seed=9, cache=False)
    xm, _ = data.mnist_arrays("test")
    xf, _ = data.fashion_arrays("test")
    pool = np.concatenate([xm, xf])
    tiles = mosaic.split_tiles(test.images)
    filled = test.sources >= 0
    np.testing.assert_array_equal(tiles[filled], pool[test.sources[filled]])


def test_tile_counts() -> None:
    test = data.build_mosaics("test")
    counts = (test.sources >= 0).sum(axis=1)
    assert counts.min() == 1 and counts.max() == 4
    shares = np.bincount(counts, minlength=5)[1:] / len(counts)
    assert np.all(np.abs(shares - 0.25) < 0.04)  # uniform 1-4 tiles
    assert 2.0 < test.targets.sum(axis=1).mean() < 2.6  # ~2.4 distinct labels per image
    two = data.build_mosaics("test", n=300, tiles=(2, 2), cache=False)
    assert np.all((two.sources >= 0).sum(axis=1) == 2)
    mnist_share = (test.sources[test.sources >= 0] < 10000).mean()
    assert 0.45 < mnist_share < 0.55  # each tile picks MNIST or Fashion with equal odds


def test_seed_reproduces_and_varies() -> None:
    a = data.build_mosaics("test", n=300, seed=5, cache=False)
    b = data.build_mosaics("test", n=300, seed=5, cache=False)
    c = data.build_mosaics("test", n=300, seed=6, cache=False)
    for field in ("images", "targets", "sources"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.images, c.images)


def test_cache_roundtrip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        mosaic, "cache_path", lambda split, n, seed, tiles: tmp_path / f"{split}-{n}-{seed}.npz"
    )
    built = data.build_mosaics("test", n=100, seed=2)
    assert (tmp_path / "test-100-2.npz").is_file()

    def no_build(*args: object) -> None:
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(mosaic, "_build", no_build)
    cached = data.build_mosaics("test", n=100, seed=2)
    np.testing.assert_array_equal(built.images, cached.images)
    np.testing.assert_array_equal(built.targets, cached.targets)


def test_load_split_mosaic() -> None:
    full = data.load_split("mosaic", "test")
    assert full.images.shape == (mosaic.TEST_SIZE, 1, 56, 56)
    assert full.task == "multilabel" and full.label_names == list(data.ALL_LABELS)
    digits = data.load_split("mosaic", "test", labels="digit_0..digit_4")
    assert len(digits) == len(full)  # column selection keeps every image
    np.testing.assert_array_equal(digits.targets, full.targets[:, :5])
    picked = data.load_split("mosaic", "test", labels="bag,digit_3", n=300, seed=1)
    ref = data.build_mosaics("test", n=300, seed=1)
    np.testing.assert_array_equal(picked.targets, ref.targets[:, [18, 3]])
    images, targets = picked.tensors()
    assert tuple(images.shape) == (300, 1, 56, 56) and tuple(targets.shape) == (300, 2)


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError, match="tiles"):
        data.build_mosaics("test", n=10, tiles=(0, 4))
    with pytest.raises(ConfigError, match="tiles"):
        data.build_mosaics("test", n=10, tiles=(3, 2))
    with pytest.raises(ConfigError, match="positive"):
        data.build_mosaics("test", n=0)
    with pytest.raises(ConfigError, match="split"):
        data.build_mosaics("val", n=10)


def test_build_speed() -> None:
    data.mnist_arrays("train"), data.fashion_arrays("train")  # warm the source caches
    start = time.perf_counter()
    train = data.build_mosaics("train", cache=False)
    elapsed = time.perf_counter() - start
    assert len(train) == mosaic.TRAIN_SIZE
    assert elapsed < 5.0, f"building 20k mosaics took {elapsed:.2f} s (target < 2 s)"
