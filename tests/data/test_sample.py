"""prepare_sample on tiny fake Fashion-MNIST idx files: layout, pixels, splits, idempotence, fetching."""

from __future__ import annotations

import csv
import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sslfg.data.build.sample as sample
from sslfg.data.datasets import CsvSplitDataset
from sslfg.data.images import DataError

N_TRAIN, N_TEST = 5, 4  # source images per class


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_source(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random 28x28 images, classes interleaved, written as the four idx .gz files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for part, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = np.tile(np.arange(10), n)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images_file, labels_file = sample.SOURCE_FILES[part]
        _write_idx(folder / images_file, images)
        _write_idx(folder / labels_file, labels)
        data[part] = images, labels
    return data


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    return tmp_path / "cache", _fake_source(tmp_path / "cache")


def _prepare(out: Path, cache: Path, **kwargs) -> Path:
    no_system = out.parent / "no-system-dir"
    return sample.prepare_sample(out, 3, 2, cache_dir=cache, system_dir=no_system, **kwargs)


def _rows(path: Path) -> list[tuple[int, str]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["class_id", "dir"]
        return [(int(c), d) for c, d in reader]


def test_layout_counts_and_pixels(tmp_path: Path, source) -> None:
    cache, data = source
    out = _prepare(tmp_path / "data" / "sample", cache)
    splits = {name: _rows(out / f"{name}.csv") for name in ("train", "val", "train_val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "val": 10, "train_val": 30, "test": 20}
    assert not set(splits["train"]) & set(splits["val"])
    assert sorted(splits["train"] + splits["val"]) == sorted(splits["train_val"])
    for name, rows in splits.items():
        part = "test" if name == "test" else "train"
        counts = np.bincount([c for c, _ in rows], minlength=10)
        assert (counts == counts[0]).all()  # balanced
        for class_id, rel in rows:
            assert rel.startswith(f"{part}/{class_id}/")
            index = int(Path(rel).stem)
            images, labels = data[part]
            assert labels[index] == class_id
            png = Image.open(out / "images" / rel)
            assert png.mode == "L" and np.array_equal(np.asarray(png), images[index])
    with open(out / "classid_classname.csv", newline="") as f:
        names = list(csv.reader(f))
    assert names[0] == ["class_id", "class_name"] and names[1] == ["0", "T-shirt/top"]
    assert names[10] == ["9", "Ankle boot"]
    ds = CsvSplitDataset(str(out), "train_val", num_classes=10)
    assert ds.classes[7] == "Sneaker" and ds[0][0].mode == "RGB"


def test_second_call_does_not_rewrite(tmp_path: Path, source, monkeypatch) -> None:
    cache, _ = source
    out = _prepare(tmp_path / "sample", cache)
    marker = (out / sample.MARKER).stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rewrote a complete sample")

    monkeypatch.setattr(sample, "_write_layout", fail)
    assert _prepare(tmp_path / "sample", cache) == out
    assert (out / sample.MARKER).stat().st_mtime_ns == marker


def test_deterministic_and_rebuilt_for_other_parameters(tmp_path: Path, source) -> None:
    cache, _ = source
    a = _rows(_prepare(tmp_path / "a", cache) / "val.csv")
    assert _rows(_prepare(tmp_path / "b", cache) / "val.csv") == a
    out = sample.prepare_sample(tmp_path / "a", 4, 1, cache_dir=cache, system_dir=tmp_path / "none")
    assert len(_rows(out / "train_val.csv")) == 40 and len(_rows(out / "test.csv")) == 10


def test_half_written_attempt_is_replaced(tmp_path: Path, source) -> None:
    cache, _ = source
    partial = tmp_path / ".sample.partial"
    (partial / "images").mkdir(parents=True)
    (partial / "junk.csv").write_text("left over")
    out = _prepare(tmp_path / "sample", cache)
    assert not partial.exists() and not (out / "junk.csv").exists()


def test_refuses_a_foreign_folder(tmp_path: Path, source) -> None:
    cache, _ = source
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="was not built by sslfg.data.build.sample"):
        _prepare(tmp_path / "mine", cache)
    assert (tmp_path / "mine" / "thesis.tex").exists()


def _fake_tools(bin_dir: Path, apt_script: str) -> None:
    """apt-get and dpkg stand-ins placed first on PATH."""
    bin_dir.mkdir()
    dest = '"$3/usr/share/datasets/fashion-mnist"'
    dpkg = f'mkdir -p {dest} && cp "$FAKE_SRC"/*.gz {dest}/'
    for name, body in (("apt-get", apt_script), ("dpkg", dpkg)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)


def test_fetches_the_package_into_the_cache(tmp_path: Path, source, monkeypatch) -> None:
    src, _ = source
    _fake_tools(tmp_path / "bin", "touch dataset-fashion-mnist_1_all.deb")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SRC", str(src))
    cache = tmp_path / "new-cache"
    out = _prepare(tmp_path / "sample", cache)
    expected = sorted(name for pair in sample.SOURCE_FILES.values() for name in pair)
    assert sorted(p.name for p in cache.iterdir()) == expected
    assert len(_rows(out / "test.csv")) == 20


def test_failed_fetch_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    _fake_tools(tmp_path / "bin", 'echo "E: Unable to locate package dataset-fashion-mnist" >&2; exit 100')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataError, match="Unable to locate package.*apt-get update") as info:
        _prepare(tmp_path / "sample", tmp_path / "cache")
    assert str(tmp_path / "cache") in str(info.value)
    assert not (tmp_path / "sample").exists()


def test_truncated_idx_file(tmp_path: Path, source) -> None:
    cache, _ = source
    path = cache / sample.SOURCE_FILES["test"][0]
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(DataError, match="is truncated"):
        _prepare(tmp_path / "sample", cache)
