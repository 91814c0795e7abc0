"""Round 3 (issue 22), data reading and evaluation: cases that gave a silent wrong result, an unclear message
or a traceback, each now an error naming the culprit and the next step, a warning, or a recorded fact.

- csv: class ids are plain ASCII digits only; a header naming a column twice is an error (item 10).
- ImageFolder discovery: linked folders followed once, images beside the class folders and files without an
  image extension logged as skipped, one extension list for every layout (item 8).
- Float TIFFs in [0, 1] load with their values; a dataset whose channel std is 0 is an error (item 9).
- A test split that is the training split, under any name: a warning and `data.test_overlaps_train` in the
  evaluation's JSON (item 5).
- `data.max_image_pixels` is the decompression-bomb limit, named in its error; a retrieval mAP that does not
  exist (every class has one test image) is left out with the reason (item 17).
- `--check` refuses what the run refuses at start-up: a test split too small for eval.knn, a box outside its
  image (items 15a, 19).
- Figures: dropped patches tinted magenta (visible on black images); the object box green and the GLS box red
  in every figure (item 22).
- The feature cache: keyed by every image's size and mtime too; an unreadable entry is recomputed (items 6, 15b).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from sslfg import figures
from sslfg.commands import knn, localise
from sslfg.data.build import stats
from sslfg.data.datasets import build_dataset
from sslfg.data.images import IMAGE_EXTENSIONS, DataError, load_image
from sslfg.data.transforms import eval_transform
from sslfg.engine.accelerator import make_accelerator
from sslfg.evaluation.features import cached_features
from sslfg.schema import DataConfig
from sslfg.weights import create_vit
from tests.conftest import write_csv_dataset
from tests.reliability.outcomes import user_error

RNG = np.random.default_rng(0)


def _noise(path: Path, size: int = 16, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format=fmt)


def _csv(root: Path, split: str, text: str, images: tuple[str, ...] = ("a.png", "b.png", "c.png")) -> None:
    for name in images:
        if not (root / "images" / name).exists():
            _noise(root / "images" / name)
    (root / f"{split}.csv").write_text(text, encoding="utf-8")


def _cfg(root: Path, **kwargs: object) -> DataConfig:
    return DataConfig(root=str(root), train_split="train", **kwargs)  # type: ignore[arg-type]


# --- item 10: csv class ids and headers ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0_2", "\u0662", " 2", "2.0", "+2", "2 ", "0x2", "\uff12"])
def test_class_id_that_int_would_accept_is_an_error_naming_file_row_and_value(tmp_path: Path, value: str) -> None:
    """int() reads "0_2" and "٢" as 2: the row would silently join class 2."""
    _csv(tmp_path, "train", f"class_id,dir\n0,a.png\n1,b.png\n{value},c.png\n")
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path), "train")
    assert f"{tmp_path / 'train.csv'}: bad class_id values: data row 3 (line 4): {value!r} is not a class id" in str(
        info.value)
    assert "plain digits 0-9" in str(info.value)


def test_class_names_file_with_a_non_ascii_id_is_an_error(tmp_path: Path) -> None:
    _csv(tmp_path, "train", "class_id,dir\n0,a.png\n1,b.png\n")
    (tmp_path / "classid_classname.csv").write_text("class_id,class_name\n0,ant\n\u0661,bee\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"classid_classname.csv, line 3: class_id '\u0661' is not a class id"):
        build_dataset(_cfg(tmp_path), "train")


def test_class_names_file_with_a_gap_names_the_missing_and_the_extra_ids(tmp_path: Path) -> None:
    """Old code: 'class ids must be exactly 0..2, each once', naming neither."""
    _csv(tmp_path, "train", "class_id,dir\n0,a.png\n2,b.png\n")
    (tmp_path / "classid_classname.csv").write_text("class_id,class_name\n0,ant\n2,bee\n3,cat\n")
    with pytest.raises(DataError, match=r"class ids must be exactly 0..2, each once; missing 1, beyond 2: 3 \(ids"):
        build_dataset(_cfg(tmp_path), "train")


@pytest.mark.parametrize("header", ["class_id,dir,class_id", "class_id,dir,dir", "class_id,dir,note,note"])
def test_header_naming_a_column_twice_is_an_error(tmp_path: Path, header: str) -> None:
    _csv(tmp_path, "train", f"{header}\n0,a.png,1,x\n1,b.png,0,y\n")
    twice = header.split(",")[-1]
    with pytest.raises(DataError, match=rf"train.csv: the header names '{twice}' more than once"):
        build_dataset(_cfg(tmp_path), "train")


# --- item 8: ImageFolder discovery -----------------------------------------------------------------------------

def _folders(root: Path, classes: dict[str, int], split: str = "train") -> None:
    for name, count in classes.items():
        for i in range(count):
            _noise(root / split / name / f"{i}.png")


def test_link_loop_does_not_multiply_images(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: os.walk followed every link again, down to the OS's limit (3 images became dozens)."""
    _folders(tmp_path, {"ant": 3, "bee": 3})
    os.symlink(".", tmp_path / "train" / "ant" / "again")  # a loop: ant/again/again/...
    (tmp_path / "train" / "bee" / "sub").mkdir()
    os.symlink("..", tmp_path / "train" / "bee" / "sub" / "back")  # the class folder, linked inside it
    os.symlink(tmp_path / "train" / "ant", tmp_path / "train" / "bee" / "elsewhere")  # a real folder: followed
    with caplog.at_level(logging.INFO):
        dataset = build_dataset(_cfg(tmp_path, format="imagefolder"), "train")
    assert dataset.labels == [0] * 3 + [1] * 6
    assert "skipped 1 linked folders already walked or above it" in caplog.text
    assert str(tmp_path / "train" / "ant" / "again") in caplog.text
    assert str(tmp_path / "train" / "bee" / "sub" / "back") in caplog.text
    os.symlink("../..", tmp_path / "train" / "bee" / "up")  # above the folder layout's root: never walked
    assert len(build_dataset(_cfg(tmp_path / "train", format="folder"), "train")) == 6


def test_images_beside_the_class_folders_and_other_files_are_logged(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    _folders(tmp_path, {"ant": 2, "bee": 2})
    _noise(tmp_path / "train" / "stray.png")
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.INFO):
        dataset = build_dataset(_cfg(tmp_path, format="imagefolder"), "train")
    assert len(dataset) == 4
    assert f"{tmp_path / 'train'}: skipped 1 images beside the class folders" in caplog.text
    assert str(tmp_path / "train" / "stray.png") in caplog.text and "Move them into their class folder" in caplog.text
    assert "skipped 1 files without an image extension" in caplog.text and "notes.txt" in caplog.text


@pytest.mark.parametrize("fmt", ["folder", "imagefolder"])
def test_every_extension_pil_reads_is_found_by_the_folder_layouts(tmp_path: Path, fmt: str) -> None:
    """.ppm and .jfif load in the csv layout (PIL reads them): the folder layouts must not drop them."""
    for i, (ext, pil_format) in enumerate([(".ppm", "PPM"), (".jfif", "JPEG"), (".tga", "TGA"), (".pgm", "PPM")]):
        _noise(tmp_path / "train" / "ant" / f"{i}{ext}", fmt=pil_format)
    dataset = build_dataset(_cfg(tmp_path, format=fmt), "train")
    assert len(dataset) == 4 and all(dataset[i][0].mode == "RGB" for i in range(4))


def test_image_extensions_are_formats_pil_opens() -> None:
    """One list for all layouts, and each entry is a format PIL decodes: no extension listed that fails."""
    Image.init()
    registered = Image.registered_extensions()
    assert all(registered.get(ext) in Image.OPEN for ext in IMAGE_EXTENSIONS)
    assert {".ppm", ".jfif", ".pgm", ".pbm", ".pnm"} <= set(IMAGE_EXTENSIONS)


# --- item 9: float images, a dataset without contrast ---------------------------------------------------------

def test_float_tiff_in_0_1_loads_with_its_values(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    grey = np.asarray(load_image(tmp_path / "f.tif"))[..., 0]
    assert grey.tolist() == np.rint(values * 255).astype(int).tolist()  # PIL's conversion: all 0 or 1
    levels = np.array([[0, 12.4, 128, 255]], dtype=np.float32)  # above 1: already 8-bit levels
    Image.fromarray(levels).save(tmp_path / "g.tif")
    assert np.asarray(load_image(tmp_path / "g.tif"))[0, :, 0].tolist() == [0, 12, 128, 255]


@pytest.mark.parametrize("bad", [-0.5, 300.0, float("nan")])
def test_float_image_outside_0_255_is_an_error_naming_the_file(tmp_path: Path, bad: float) -> None:
    values = np.array([[0.0, 0.5, bad, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=rf"{tmp_path / 'f.tif'} is a float image with values in .*\[0, 1\]"):
        load_image(tmp_path / "f.tif")


def test_dataset_whose_std_is_0_is_an_error_naming_the_data(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / "images").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (0, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "train.csv").write_text("class_id,dir\n0,0.png\n1,1.png\n0,2.png\n")
    with pytest.raises(DataError) as info:
        stats.channel_stats(_cfg(tmp_path, image_size=8, num_workers=0))
    message = str(info.value)
    assert str(tmp_path / "train.csv") in message and "channel R, G, B has the same value" in message
    assert "std is 0" in message and "all-black" in message


# --- items 6 and 15b: the feature cache ------------------------------------------------------------------------

def _cached(data: Path, cache: Path):
    cfg = DataConfig(root=str(data), image_size=16, num_workers=0)
    dataset = build_dataset(cfg, "test", eval_transform(16, cfg.mean, cfg.std, crop_ratio=1.0))
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    return cached_features(vit, dataset, "test", cache, make_accelerator(), batch_size=4, num_workers=0)


def test_image_replaced_in_place_is_not_served_from_the_cache(tmp_path: Path) -> None:
    """Before: the key held the file names only, so the second run returned the old image's features."""
    data = write_csv_dataset(tmp_path / "data", n_train=3, n_test=4)
    before, _ = _cached(data, tmp_path / "cache")
    image = data / "images" / "test" / "0" / "0000.png"
    stamp = image.stat()
    Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(image)  # same name, new pixels
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))  # a coarse clock: still a new mtime
    after, _ = _cached(data, tmp_path / "cache")
    assert not torch.equal(before[0], after[0]) and torch.equal(before[1:], after[1:])
    assert len(list((tmp_path / "cache").glob("test-*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "empty", "other split"])
def test_unreadable_feature_cache_is_recomputed_with_a_warning(tmp_path: Path, damage: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    data = write_csv_dataset(tmp_path / "data", n_train=3, n_test=4)
    features, labels = _cached(data, tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("test-*.safetensors")
    content = {"truncated": path.read_bytes()[:-40], "empty": b"",
               "other split": save({"features": features[:2].contiguous(), "labels": labels[:2].contiguous()})}[damage]
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        again, again_labels = _cached(data, tmp_path / "cache")
    assert torch.equal(again, features) and torch.equal(again_labels, labels)
    assert f"feature cache {path}" in caplog.text and "recomputing it" in caplog.text
    assert _cached(data, tmp_path / "cache")[0].equal(features)  # the rewritten file reads back



# --- item 5: a test split that is (partly) the training split --------------------------------------------------

KNN_TINY = ["--random-init", "--model", "vit_tiny_patch16_224",
            "model_kwargs={patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}", "data.image_size=16",
            "data.num_workers=0", "data.train_split=train", "knn.ks=[1]", "knn.figures=false"]


@pytest.mark.parametrize("test_split", ["train", "./train"])
def test_test_split_equal_to_the_training_split_is_warned_and_recorded(tmp_path: Path, test_split: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Before: 100 % 1-NN on the training images themselves, no warning, nothing in knn.json."""
    data = write_csv_dataset(tmp_path / "data", n_train=6, n_test=4)
    with caplog.at_level(logging.WARNING):
        result = knn.main([*KNN_TINY, f"data.root={data}", f"data.test_split={test_split}",
                           f"output_dir={tmp_path / 'out'}"])
    assert result["data.test_overlaps_train"] == 6 and result["knn.k1.top1"] == 1.0
    assert json.loads((tmp_path / "out" / "knn.json").read_text())["data.test_overlaps_train"] == 6
    assert "lists 6 images that the training split" in caplog.text and "measure memory" in caplog.text
    clean = knn.main([*KNN_TINY, f"data.root={data}", "data.test_split=test", f"output_dir={tmp_path / 'out2'}"])
    assert clean["data.test_overlaps_train"] == 0


# --- item 17: the decompression-bomb limit is a key; a retrieval mAP without a number --------------------------

def test_image_over_data_max_image_pixels_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the error told the user to raise PIL.Image.MAX_IMAGE_PIXELS, which no key sets."""
    data = write_csv_dataset(tmp_path / "data", n_train=6, n_test=4)  # 16x16 = 256 pixels each
    argv = [*KNN_TINY, f"data.root={data}", "data.test_split=test", f"output_dir={tmp_path / 'out'}"]
    message = user_error(knn.main, [*argv, "data.max_image_pixels=255"], capsys)
    assert "is a 16x16 image (256 pixels), more than data.max_image_pixels = 255 allows" in message
    assert "raise data.max_image_pixels if the file is trusted" in message and str(data / "images") in message
    assert "truncated, corrupt" not in message and ".." not in message  # it was called corrupt too
    assert knn.main([*argv, "data.max_image_pixels=256"])["knn.k1.top1"] >= 0  # at the limit: loads
    assert DataConfig().max_image_pixels == 2 * 89_478_485  # PIL's own refusal threshold
    assert "data.max_image_pixels" in user_error(knn.main, [*argv, "data.max_image_pixels=0"], capsys)


def test_retrieval_map_without_a_same_class_pair_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `| retrieval.mAP | nan % |` with no reason, and NaN in knn.json."""
    data = write_csv_dataset(tmp_path / "data", n_train=6, n_test=3)  # 3 classes, one test image each
    with caplog.at_level(logging.WARNING):
        result = knn.main([*KNN_TINY, f"data.root={data}", "data.test_split=test", f"output_dir={tmp_path / 'out'}"])
    assert "retrieval.mAP" not in result and result["protocol.retrieval_mAP"].startswith(
        "n/a: every class has one test image")
    assert "retrieval.mAP: n/a: every class has one test image" in caplog.text
    assert "nan" not in capsys.readouterr().out.lower()
    assert "NaN" not in (tmp_path / "out" / "knn.json").read_text()


# --- items 15a and 19: --check reads what the run refuses at start-up ------------------------------------------

@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
def test_test_split_of_one_image_is_refused_at_start_up(tmp_path: Path, check: bool,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a ValueError traceback from the retrieval, after the features were extracted; --check passed."""
    data = write_csv_dataset(tmp_path / "data", n_train=6, n_test=1)
    argv = [*KNN_TINY, f"data.root={data}", "data.test_split=test", f"output_dir={tmp_path / 'out'}"]
    message = user_error(knn.main, [*argv, *(["--check"] if check else [])], capsys)
    assert message.startswith(f"data.test_split 'test' ({data / 'test.csv'}) has 1 image; eval.knn needs at least 2")
    assert "knn.retrieval=false knn.figures=false" in message and not (tmp_path / "out" / "features").exists()
    assert knn.main([*argv, "knn.retrieval=false"])["knn.k1.top1"] >= 0  # knn.figures=false in KNN_TINY


def test_check_refuses_a_box_outside_its_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: --check passed, and the run (eval.localise, a GLSim fine-tune after training) refused the box."""
    data = write_csv_dataset(tmp_path / "data", n_train=4, n_test=2)  # 16x16 images
    for split in ("train", "test"):
        rows = (data / f"{split}.csv").read_text().splitlines()
        boxes = ["0,0,16,16"] * (len(rows) - 2) + ["2,3,16,17"]  # the last row's box passes the bottom edge
        (data / f"{split}.csv").write_text("\n".join([rows[0] + ",x0,y0,x1,y1"] + [
            f"{row},{box}" for row, box in zip(rows[1:], boxes, strict=True)]) + "\n")
    message = user_error(localise.main, [*KNN_TINY, f"data.root={data}", "data.test_split=test", "data.boxes=true",
                                         f"output_dir={tmp_path / 'out'}", "--check"], capsys)
    assert message.startswith(f"{data / 'train.csv'}, data row 4 (line 5): object box (2, 3, 16, 17) lies outside "
                              "its 16x16 image")


# --- item 22: figures that show what they draw on any data ------------------------------------------------------

RED, GREEN = (230, 0, 0), (0, 200, 0)  # the GLS box and the object box, in every figure


def _pixels(path: Path, colour: tuple[int, int, int]) -> int:
    return int((np.asarray(Image.open(path).convert("RGB")) == colour).all(axis=2).sum())


def test_dropped_patches_show_on_black_images(tmp_path: Path) -> None:
    """Before: dropped patches were dimmed to 0.2 x the image, so on black data kept and dropped looked the same."""
    black = torch.zeros(1, 3, 16, 16)
    overlay = figures.kept_overlay(black, torch.tensor([[0]]), patch_size=8)  # keeps the top-left patch
    assert overlay[0, :, :8, :8].max() == 0  # kept: the image itself
    assert overlay[0, 0, 8:, 8:].min() > 0.5 and overlay[0, 2, 8:, 8:].min() > 0.5 and overlay[0, 1].max() == 0
    path = figures.save_mask_figure(black, black, torch.tensor([[0]]), torch.tensor([[3]]), 8, tmp_path / "m.png",
                                    "kept patches")
    assert _pixels(path, (153, 0, 153)) > 0  # magenta at 0.6 on black


def test_object_and_gls_boxes_keep_their_colour_across_figures(tmp_path: Path) -> None:
    """Before: the GLS box was red in figures/localise.png and green (the object's colour) in gls_crops.png."""
    images, box = torch.zeros(2, 3, 16, 16), torch.tensor([[2, 2, 12, 12]] * 2)
    crops = figures.save_crop_figure(images, box, images, torch.rand(2, 4), 1, tmp_path / "crops.png")
    local = figures.save_localisation_figure(images, box, torch.tensor([[0], [1]]), box + 1, 8, tmp_path / "loc.png",
                                             "kept 1/4 patches")
    assert _pixels(crops, RED) > 0 and _pixels(local, RED) > 0  # the GLS box
    assert _pixels(crops, GREEN) == 0 and _pixels(local, GREEN) > 0  # the object box, only where it is drawn
