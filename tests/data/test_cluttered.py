"""The cluttered sample on tiny fake Fashion-MNIST idx files: deterministic bytes, tight boxes around the garment,
clutter off the box, the sample's rows and splits."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslfg.data.boxes import eval_boxes
from sslfg.data.build import cluttered, sample
from sslfg.data.datasets import build_dataset
from sslfg.data.images import DataError
from sslfg.schema import DataConfig

N_TRAIN, N_TEST = 5, 4  # source images per class


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _garments(n: int, rng: np.random.Generator) -> np.ndarray:
    """Black 28x28 images, each with a random bright rectangle plus one stray pixel: tight boxes of all sizes."""
    images = np.zeros((n, 28, 28), np.uint8)
    for image in images:
        y0, x0 = rng.integers(0, 20, 2)
        y1, x1 = y0 + rng.integers(1, 9), x0 + rng.integers(1, 9)
        image[y0:y1, x0:x1] = rng.integers(1, 256, (y1 - y0, x1 - x0))
        image[tuple(rng.integers(0, 28, 2))] = 255
    return images


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path / "cache"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for part, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = np.tile(np.arange(10), n)
        images[part] = _garments(len(labels), rng)
        images_file, labels_file = sample.SOURCE_FILES[part]
        _write_idx(folder / images_file, images[part])
        _write_idx(folder / labels_file, labels)
    return folder, images


def _build(out: Path, cache: Path) -> Path:
    return cluttered.prepare_cluttered(out, 3, 2, cache_dir=cache, system_dir=out.parent / "no-system-dir")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes(tmp_path: Path, source) -> None:
    cache, _ = source
    first, second = _files(_build(tmp_path / "a", cache)), _files(_build(tmp_path / "b", cache))
    assert len(first) == 30 + 20 + 6 and first == second  # 50 PNGs, 5 csv files, the marker


def test_box_is_tight_around_the_garment_and_clutter_stays_off_it(tmp_path: Path, source) -> None:
    cache, images = source
    out = _build(tmp_path / "c", cache)
    positions, clutter_pixels = set(), []
    for split in ("train_val", "test"):
        with open(out / f"{split}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == {"train_val": 30, "test": 20}[split]
        for row in rows:
            part, _, name = row["dir"].split("/")
            garment = images[part][int(name.removesuffix(".png"))]
            canvas = np.asarray(Image.open(out / "images" / row["dir"]))
            assert canvas.shape == (84, 84)
            x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
            ys, xs = np.nonzero(garment)  # the garment's own tight box, computed here
            gx0, gy0, gx1, gy1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            assert 0 <= x0 < x1 <= 84 and 0 <= y0 < y1 <= 84  # wholly inside the canvas
            assert (x1 - x0, y1 - y0) == (gx1 - gx0, gy1 - gy0)
            # exactly the garment inside the box: tight, and no clutter pixel on it
            assert np.array_equal(canvas[y0:y1, x0:x1], garment[gy0:gy1, gx0:gx1])
            outside = canvas.copy()
            outside[y0:y1, x0:x1] = 0
            clutter_pixels.append(int((outside > 0).sum()))
            positions.add((x0 - gx0, y0 - gy0))
    assert min(clutter_pixels) > 0  # every image has clutter
    assert len(positions) > 25  # garments land at many places, not one


def test_rows_and_splits_are_the_samples_and_boxes_load(tmp_path: Path, source) -> None:
    cache, _ = source
    out = _build(tmp_path / "c", cache)
    plain = sample.prepare_sample(tmp_path / "s", 3, 2, cache_dir=cache, system_dir=tmp_path / "no-system-dir")
    for split in ("train", "val", "train_val", "test"):
        with open(out / f"{split}.csv") as a, open(plain / f"{split}.csv") as b:
            assert [r[:2] for r in csv.reader(a)] == list(csv.reader(b))
    ds = build_dataset(DataConfig(root=str(out), train_split="train_val", boxes=True), "test")
    with open(out / "test.csv") as f:
        expected = [[float(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in csv.DictReader(f)]
    assert eval_boxes(ds, 84, 1.0).tolist() == expected  # 84 px at crop 1: the eval transform is the identity


def test_tight_box_by_hand() -> None:
    image = np.zeros((6, 8), np.uint8)
    image[2, 3] = image[4, 6] = 1
    assert cluttered.tight_box(image) == (3, 2, 7, 5)
    with pytest.raises(ValueError, match="black"):
        cluttered.tight_box(np.zeros((4, 4), np.uint8))


def test_black_garment_is_an_error_naming_it(tmp_path: Path, source) -> None:
    cache, images = source
    images["test"][:] = 0
    _write_idx(cache / sample.SOURCE_FILES["test"][0], images["test"])
    with pytest.raises(DataError, match=r"Fashion-MNIST test image \d+: the image is black"):
        _build(tmp_path / "c", cache)
