"""Case 3, damaged inputs: every kind of bad file gives its documented outcome.

- CMYK JPEG, 16-bit PNG, a PNG named .jpg: load as 8-bit RGB, in both data.on_bad_image modes.
- Truncated JPEG, zero-byte file, text named .png, missing file: with `error` one DataError naming the
  file, the csv and the data row (a missing file when the dataset is built, an unreadable one when it
  is loaded); with `skip` dropped when the dataset is built, each logged and listed in
  `dataset.skipped`, and counted in summary.json, knn.json and the fine-tune metrics.json.
- A class id out of range, a missing csv column: an error in both modes (annotations, not images).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslfg.cli import run_cli
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn
from sslfg.commands import pretrain as train_ssl
from sslfg.config import ConfigError, load_config
from sslfg.data.datasets import CsvSplitDataset, build_dataset
from sslfg.data.images import DataError
from sslfg.schema import DataConfig, PretrainConfig
from tests.conftest import write_csv_dataset
from tests.reliability.outcomes import user_error
from tests.reliability.procs import finetune_args, pretrain_args
from tests.test_eval_knn import data_args

RNG = np.random.default_rng(0)
LOADABLE = ("cmyk.jpg", "grey16.png", "png_named.jpg")
UNREADABLE = ("truncated.jpg", "empty.jpg", "text.png", "missing.jpg")


def _noise(size: int = 16) -> np.ndarray:
    return RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _make(path: Path, kind: str) -> None:
    """Writes the file `kind` names (nothing for the missing one)."""
    if kind == "truncated.jpg":
        Image.fromarray(_noise(64)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "empty.jpg":
        path.write_bytes(b"")
    elif kind == "text.png":
        path.write_text("not an image\n")
    elif kind == "png_named.jpg":
        Image.fromarray(_noise()).save(path, format="PNG")
    elif kind == "cmyk.jpg":
        Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # red
    elif kind == "grey16.png":
        Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)).save(path)  # white, I;16
    elif kind != "missing.jpg":
        Image.fromarray(_noise()).save(path)


def damaged_csv(root: Path, kinds: tuple[str, ...]) -> list[str]:
    """root/train.csv: good images (class 0, 1, 2, ...) with one file of each kind in between; the
    listed names in order. Row r (1-based) of the csv is `names[r - 1]`."""
    (root / "images").mkdir(parents=True)
    names = []
    for i, kind in enumerate(kinds):
        names += [f"good{i}.png", kind]
    names.append("last.png")
    for name in names:
        _make(root / "images" / name, name)
    rows = [f"{i % 3},{name}" for i, name in enumerate(names)]
    (root / "train.csv").write_text("class_id,dir\n" + "\n".join(rows) + "\n")
    return names


def _where(root: Path, names: list[str], name: str) -> list[str]:
    """What a message about `name` must contain: the file, the csv and the data row / file line."""
    row = names.index(name) + 1
    return [str(root / "images" / name), str(root / "train.csv"), f"data row {row} (line {row + 1})"]


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_cmyk_16_bit_and_wrong_extension_load_as_rgb(tmp_path: Path, mode: str) -> None:
    names = damaged_csv(tmp_path, LOADABLE)
    ds = build_dataset(DataConfig(root=str(tmp_path), on_bad_image=mode), "train")
    assert ds.skipped == [] and len(ds) == len(names)
    images = {Path(path).name: ds[i][0] for i, path in enumerate(ds.paths)}
    assert all(img.mode == "RGB" and img.size == (16, 16) for img in images.values())
    assert np.abs(np.asarray(images["cmyk.jpg"]).astype(int) - [255, 0, 0]).max() <= 2
    assert (np.asarray(images["grey16.png"]) == 255).all()  # 16-bit white scaled, not clipped


@pytest.mark.parametrize("kind", UNREADABLE)
def test_error_mode_names_file_csv_and_row(tmp_path: Path, kind: str) -> None:
    names = damaged_csv(tmp_path, (kind,))
    cfg = DataConfig(root=str(tmp_path))
    if kind == "missing.jpg":  # found when the dataset is built
        with pytest.raises(DataError, match="do not exist") as info:
            build_dataset(cfg, "train")
    else:  # found when it is loaded
        ds = build_dataset(cfg, "train")
        with pytest.raises(DataError) as info:
            ds[names.index(kind)]
    for text in _where(tmp_path, names, kind):
        assert text in str(info.value)


def test_skip_mode_drops_each_unreadable_file_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = damaged_csv(tmp_path, UNREADABLE + LOADABLE)
    with caplog.at_level(logging.WARNING, logger="sslfg.data.datasets"):
        ds = build_dataset(DataConfig(root=str(tmp_path), on_bad_image="skip"), "train")
    assert [Path(path).name for path, _ in ds.skipped] == list(UNREADABLE)
    kept = [name for name in names if name not in UNREADABLE]
    assert [Path(p).name for p in ds.paths] == kept
    assert ds.labels == [names.index(name) % 3 for name in kept]
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for (_, reason), kind in zip(ds.skipped, UNREADABLE, strict=True):
        for text in _where(tmp_path, names, kind):
            assert text in reason and text in warnings
    assert f"skipped {len(UNREADABLE)} of {len(names)} images" in warnings
    # A later failure still names the image's own csv row, not its position after the dropped ones.
    (tmp_path / "images" / "last.png").write_bytes(b"")
    with pytest.raises(DataError) as info:
        ds[len(ds) - 1]
    for text in _where(tmp_path, names, "last.png"):
        assert text in str(info.value)


def test_skip_mode_with_no_readable_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _make(tmp_path / "images" / "empty.jpg", "empty.jpg")
    (tmp_path / "train.csv").write_text("class_id,dir\n0,empty.jpg\n0,missing.jpg\n")
    with pytest.raises(DataError, match="every one of the 2 images of this split is unreadable"):
        CsvSplitDataset(str(tmp_path), "train", on_bad_image="skip")


@pytest.mark.parametrize("layout", ["imagefolder", "folder"])
def test_skip_mode_in_the_folder_layouts(tmp_path: Path, layout: str) -> None:
    for name in ("a.png", "empty.jpg", "truncated.jpg"):
        (tmp_path / "train" / "cls").mkdir(parents=True, exist_ok=True)
        _make(tmp_path / "train" / "cls" / name, name)
    ds = build_dataset(DataConfig(root=str(tmp_path), format=layout, on_bad_image="skip"), "train")
    assert [Path(p).name for p in ds.paths] == ["a.png"]
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["empty.jpg", "truncated.jpg"]
    assert all(f"image folder {tmp_path}" in reason for _, reason in ds.skipped)


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("csv, named", [
    ("class_id,dir\n0,good0.png\n7,last.png\n", ["data row 2 (line 3)", r"class_id 7 is outside [0, 3)"]),
    ("label,dir\n0,good0.png\n", ["has no column 'class_id'", "its header is ['label', 'dir']"]),
], ids=["class-id-out-of-range", "missing-column"])
def test_annotation_errors_are_errors_in_both_modes(tmp_path: Path, mode: str, csv: str, named: list[str]) -> None:
    damaged_csv(tmp_path, ())
    (tmp_path / "bad.csv").write_text(csv)
    with pytest.raises(DataError) as info:
        build_dataset(DataConfig(root=str(tmp_path), num_classes=3, on_bad_image=mode), "bad")
    assert str(tmp_path / "bad.csv") in str(info.value)
    for text in named:
        assert text in str(info.value)


def test_on_bad_image_is_validated() -> None:
    assert load_config(None, [], PretrainConfig).data.on_bad_image == "error"
    with pytest.raises(ConfigError, match=r"data.on_bad_image: expected one of 'error', 'skip', got str 'Skip'"):
        load_config(None, ["data.on_bad_image=Skip"], PretrainConfig)
    with pytest.raises(DataError, match="data.on_bad_image"):
        CsvSplitDataset("/", "train", on_bad_image="drop")  # type: ignore[arg-type]


@pytest.fixture
def damaged_tiny(tmp_path: Path) -> Path:
    """The tiny dataset with two unreadable training images (rows 2 and 5) and a missing test image (row 3)."""
    root = write_csv_dataset(tmp_path / "data")
    train = [line.split(",")[1] for line in (root / "train.csv").read_text().splitlines()[1:]]
    test = [line.split(",")[1] for line in (root / "test.csv").read_text().splitlines()[1:]]
    truncated = root / "images" / train[1]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / "images" / train[4]).write_bytes(b"")
    (root / "images" / test[2]).unlink()
    return root


def test_skip_mode_runs_end_to_end_and_counts_the_skipped(damaged_tiny: Path, tmp_path: Path) -> None:
    skip = "data.on_bad_image=skip"
    run = tmp_path / "pre"
    assert run_cli(train_ssl.main, [*pretrain_args(damaged_tiny, run, **{"train.max_steps": 2}), skip]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["data.skipped_images"] == 2
    knn_args = ["--checkpoint", str(run), *data_args(damaged_tiny), "knn.figures=false", skip]
    assert knn.main(knn_args)["data.skipped_images"] == 3  # bank (train) 2 + queries (test) 1
    assert json.loads((run / "eval" / "knn.json").read_text())["data.skipped_images"] == 3
    ft = tmp_path / "ft"
    assert run_cli(finetune_cli.main, [*finetune_args(damaged_tiny, ft, **{"train.epochs": 1}), skip]) == 0
    assert json.loads((ft / "metrics.json").read_text())["data.skipped_images"] == 3


@pytest.mark.parametrize("workers", [0, 1])  # 1: the DataError comes back from a DataLoader worker
def test_error_mode_stops_the_run_naming_file_and_row(damaged_tiny: Path, tmp_path: Path, workers: int,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (damaged_tiny / "images" / "train" / "1" / "0004.png").unlink()  # row 5: now missing, not empty
    args = pretrain_args(damaged_tiny, tmp_path / "run", **{"train.max_steps": 3, "data.num_workers": workers})
    message = user_error(train_ssl.main, args, capsys)
    assert "do not exist" in message and "data row 5 (line 6)" in message  # at construction
    assert str(damaged_tiny / "images" / "train" / "1" / "0004.png") in message
    (damaged_tiny / "images" / "train" / "1" / "0004.png").write_bytes(b"")
    message = user_error(train_ssl.main, args, capsys)  # while training: the first bad image it meets
    assert "data row 2 (line 3)" in message or "data row 5 (line 6)" in message
    assert str(damaged_tiny / "train.csv") in message and "Original Traceback" not in message
