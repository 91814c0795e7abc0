"""Malformed datasets (issue 11, data items): each case is an error naming the culprit and the next
step, a warning that says what was done, or documented behaviour (README "Data layouts").

- ImageFolder: class ids come from the training split's folders for every split; a class folder the
  training split lacks is an error; a class missing from a smaller split is logged (end to end: kNN).
- csv: a duplicate row, 1-based or gapped ids without classid_classname.csv, a non-UTF-8 file, a
  row naming a folder: errors; test classes without training images and images listed in both the
  training and the test split: warnings naming them.
- EXIF orientation: applied, so a phone photo loads upright.
- Object boxes (issue 13, `data.boxes`): a missing box column, a non-numeric, empty, negative or non-finite
  box, and a box past its image's edge are errors naming the csv and the row.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslfg.commands import knn
from sslfg.data.boxes import eval_boxes
from sslfg.data.datasets import build_dataset
from sslfg.data.images import DataError, load_image
from sslfg.schema import DataConfig
from tests.reliability.outcomes import user_error

RNG = np.random.default_rng(0)
TINY = "model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"


def _noise(path: Path, size: int = 16) -> np.ndarray:
    """Writes a random RGB PNG at `path`; returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def _folders(root: Path, split: str, classes: dict[str, int]) -> None:
    """root/<split>/<class>/<i>.png: `classes[name]` noise images per class."""
    for name, count in classes.items():
        for i in range(count):
            _noise(root / split / name / f"{i}.png")


def _csv_data(root: Path, splits: dict[str, list[tuple[int, str]]]) -> None:
    """root/<split>.csv with the given (class_id, dir) rows, and a noise image for every dir."""
    for split, rows in splits.items():
        for _, rel in rows:
            if not (root / "images" / rel).exists():
                _noise(root / "images" / rel)
        (root / f"{split}.csv").write_text("class_id,dir\n" + "".join(f"{c},{d}\n" for c, d in rows))


def _cfg(root: Path, **kwargs: object) -> DataConfig:
    return DataConfig(root=str(root), train_split="train", **kwargs)  # type: ignore[arg-type]


# --- item 1: one class mapping for every ImageFolder split -------------------------------------------------

def test_imagefolder_test_split_missing_a_class_keeps_the_training_ids(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    _folders(tmp_path, "train", {"ant": 2, "bee": 2, "cat": 2})
    _folders(tmp_path, "test", {"ant": 1, "cat": 1})
    cfg = _cfg(tmp_path, format="imagefolder")
    train = build_dataset(cfg, "train")
    with caplog.at_level(logging.WARNING):
        test = build_dataset(cfg, "test")
    assert test.classes == train.classes == ["ant", "bee", "cat"] and test.num_classes == 3
    assert test.labels == [0, 2]  # cat keeps id 2, as in training
    assert "bee" in caplog.text and str(tmp_path / "test") in caplog.text


def test_imagefolder_split_with_a_class_the_training_split_lacks_is_an_error(tmp_path: Path) -> None:
    _folders(tmp_path, "train", {"ant": 1, "cat": 1})
    _folders(tmp_path, "test", {"ant": 1, "bee": 1, "cat": 1})
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path, format="imagefolder"), "test")
    message = str(info.value)
    assert "'bee'" in message and str(tmp_path / "test") in message and str(tmp_path / "train") in message


def test_knn_on_imagefolder_with_a_class_missing_from_test_is_correct(tmp_path: Path) -> None:
    """Each test image is a copy of one training image, so 1-NN is exact iff labels agree across splits."""
    data = tmp_path / "data"
    _folders(data, "train", {"ant": 2, "bee": 2, "cat": 2})
    for name in ("ant", "cat"):  # no bee in the test split
        (data / "test" / name).mkdir(parents=True)
        for i in range(2):
            (data / "test" / name / f"{i}.png").write_bytes((data / "train" / name / f"{i}.png").read_bytes())
    result = knn.main(["--random-init", "--model", "vit_tiny_patch16_224", TINY, f"output_dir={tmp_path / 'out'}",
                       f"data.root={data}", "data.format=imagefolder", "data.train_split=train",
                       "data.image_size=16", "data.num_workers=0", "knn.ks=[3]", "knn.figures=false",
                       "features.cache=false"])
    assert result["knn.k1.top1"] == 1.0


# --- item 3: csv class ids, duplicates, unseen classes, leakage ---------------------------------------------

def test_duplicate_csv_row_is_an_error_naming_both_rows(tmp_path: Path) -> None:
    _csv_data(tmp_path, {"train": [(0, "a.png"), (1, "b.png"), (0, "a.png"), (0, "./b.png")]})
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path), "train")
    message = str(info.value)
    assert str(tmp_path / "train.csv") in message and "2 images are listed more than once" in message
    assert "data rows 1 (line 2) and 3 (line 4) both list a.png" in message
    assert "data rows 2 (line 3) and 4 (line 5) both list ./b.png with class ids 1 and 0" in message


def test_one_image_listed_twice_through_a_link_is_a_duplicate(tmp_path: Path) -> None:
    """Two paths to one file (a symlink, or a linked folder) count it twice, as the train/test check sees it."""
    _csv_data(tmp_path, {"train": [(0, "a.png"), (1, "b.png")]})
    (tmp_path / "images" / "link.png").symlink_to("a.png")
    (tmp_path / "images" / "again").symlink_to(tmp_path / "images")
    _csv_data(tmp_path, {"train": [(0, "a.png"), (1, "b.png"), (0, "link.png"), (1, "again/b.png")]})
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path), "train")
    message = str(info.value)
    assert "2 images are listed more than once" in message
    assert "data rows 1 (line 2) and 3 (line 4) list a.png and link.png, one file (through a link)" in message
    assert "data rows 2 (line 3) and 4 (line 5) list b.png and again/b.png, one file" in message


@pytest.mark.parametrize("delimiter, name", [(";", "semicolon"), ("\t", "tab")])
def test_a_csv_with_another_separator_is_named_so(tmp_path: Path, delimiter: str, name: str) -> None:
    _csv_data(tmp_path, {"train": [(0, "a.png"), (1, "b.png")]})
    (tmp_path / "train.csv").write_text(f"class_id{delimiter}dir\n0{delimiter}a.png\n1{delimiter}b.png\n")
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path), "train")
    assert f"the file seems {name}-separated" in str(info.value) and "save it with commas" in str(info.value)


@pytest.mark.parametrize("ids, absent", [((1, 2, 3), "0"), ((0, 2, 3), "1")], ids=["1-based", "gap"])
def test_ids_that_are_not_0_to_c_minus_1_need_a_declared_class_count(tmp_path: Path, ids: tuple[int, ...],
                                                                      absent: str) -> None:
    _csv_data(tmp_path, {"train": [(c, f"{c}.png") for c in ids]})
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path), "train")
    message = str(info.value)
    assert str(tmp_path / "train.csv") in message and f"no row has class {absent}," in message
    assert "data.num_classes=4" in message and "classid_classname.csv" in message
    declared = build_dataset(_cfg(tmp_path, num_classes=4), "train")  # the documented way to keep the ids
    assert declared.num_classes == 4 and declared.labels == list(ids)


def test_test_classes_without_training_images_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _csv_data(tmp_path, {"train": [(0, "t0.png"), (1, "t1.png")],
                         "test": [(0, "q0.png"), (2, "q2a.png"), (2, "q2b.png"), (3, "q3.png")]})
    (tmp_path / "classid_classname.csv").write_text("class_id,class_name\n0,ant\n1,bee\n2,cat\n3,dog\n")
    with caplog.at_level(logging.WARNING):
        test = build_dataset(_cfg(tmp_path), "test")
    assert test.labels == [0, 2, 2, 3] and test.num_classes == 4
    unseen = next(r.getMessage() for r in caplog.records if "no images of (" in r.getMessage())
    assert "3 images of 2 classes" in unseen and "2 'cat'; 3 'dog'" in unseen and "classify them correctly" in unseen
    absent = next(r.getMessage() for r in caplog.records if "of the 2 training classes" in r.getMessage())
    assert "1 'bee'" in absent and str(tmp_path / "test.csv") in absent


def test_test_class_beyond_an_inferred_class_count_is_an_error(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Without a declared count the training split defines the classes: 0..1 here, so id 2 has no class."""
    _csv_data(tmp_path, {"train": [(0, "t0.png"), (1, "t1.png")], "test": [(0, "q0.png"), (2, "q2.png")]})
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path), "test")
    message = str(info.value)
    assert str(tmp_path / "test.csv") in message and "data row 2 (line 3): class_id 2 is outside [0, 2)" in message
    assert str(tmp_path / "train.csv") in message and "data.num_classes" in message
    _csv_data(tmp_path, {"test": [(0, "q0.png")]})  # a smaller test split keeps the training count, and says so
    with caplog.at_level(logging.WARNING):
        assert build_dataset(_cfg(tmp_path), "test").num_classes == 2
    assert "no images of 1 of the 2 training classes (1)" in caplog.text


def test_image_in_both_training_and_test_split_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _csv_data(tmp_path, {"train": [(0, "a.png"), (1, "b.png")], "test": [(0, "c.png")]})
    (tmp_path / "images" / "sub").mkdir()
    (tmp_path / "test.csv").write_text("class_id,dir\n0,c.png\n1,sub/../b.png\n")  # b.png, spelt otherwise
    with caplog.at_level(logging.WARNING):
        build_dataset(_cfg(tmp_path), "test")
        build_dataset(_cfg(tmp_path, val_split="test", test_split="other"), "test")  # checked for the test split only
    leaks = [r.getMessage() for r in caplog.records if "also lists" in r.getMessage()]
    assert len(leaks) == 1 and "lists 1 images" in leaks[0] and "sub/../b.png" in leaks[0]
    assert str(tmp_path / "train.csv") in leaks[0] and "Remove them from one of the two splits" in leaks[0]


# --- items 5 and 6: a csv that is not UTF-8, a row that names a folder --------------------------------------

def test_latin1_csv_is_one_error_naming_file_line_and_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _csv_data(data, {"train": [(0, "a.png"), (1, "b.png")], "test": [(0, "c.png"), (1, "café.png")]})
    raw = "class_id,dir\n0,c.png\n1,café.png\n".encode("latin-1")
    (data / "test.csv").write_bytes(raw)
    message = user_error(knn.main, ["--random-init", "--model", "vit_tiny_patch16_224", TINY, f"data.root={data}",
                                    "data.train_split=train", "data.image_size=16", "data.num_workers=0",
                                    f"output_dir={tmp_path / 'out'}"], capsys)
    byte = raw.index(b"\xe9")
    assert f"{data / 'test.csv'} is not UTF-8 text: line 3, byte {byte} is 0xe9" in message
    assert "iconv -f latin1 -t utf-8" in message


def test_utf8_csv_with_byte_order_mark_and_non_ascii_names_loads(tmp_path: Path) -> None:
    _csv_data(tmp_path, {"train": [(0, "café.png"), (1, "b.png")]})
    (tmp_path / "train.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "train.csv").read_bytes())
    assert build_dataset(_cfg(tmp_path), "train").paths[0] == str(tmp_path / "images" / "café.png")


def test_csv_row_naming_a_folder_says_it_is_a_folder(tmp_path: Path) -> None:
    _csv_data(tmp_path, {"train": [(0, "a/0.png")]})
    (tmp_path / "train.csv").write_text("class_id,dir\n0,a/0.png\n1,a\n1,gone.png\n")
    with pytest.raises(DataError) as info:
        build_dataset(_cfg(tmp_path), "train")
    message = str(info.value)
    assert f"data row 2 (line 3): {tmp_path / 'images' / 'a'} is a folder, not an image file" in message
    assert "1 do not exist and 1 are folders" in message and "one image file per row" in message


# --- item 3: EXIF orientation --------------------------------------------------------------------------------

# What a viewer does to the stored pixels for each EXIF orientation (the TIFF/EXIF specification's table).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise (a phone held upright)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    stored = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)  # not square: a rotation changes the size
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    assert np.array_equal(np.asarray(load_image(tmp_path / "photo.png")), UPRIGHT[orientation](stored))


def test_phone_jpeg_loads_upright(tmp_path: Path) -> None:
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = 255  # left half white as stored; a 90° clockwise turn puts it on top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "phone.jpg")).mean(axis=2)
    assert upright.shape == (32, 16)
    assert upright[:14].min() > 200 and upright[18:].max() < 50


# --- issue 13: object-box columns (data.boxes) --------------------------------------------------------------

def _boxed(root: Path, boxes: list[str], header: str = "class_id,dir,x0,y0,x1,y1") -> None:
    """root/train.csv with one 16x16 noise image per row and the given box text per row."""
    _csv_data(root, {"train": [(i % 2, f"{i}.png") for i in range(len(boxes))]})
    rows = "".join(f"{i % 2},{i}.png,{box}\n" for i, box in enumerate(boxes))
    (root / "train.csv").write_text(f"{header}\n{rows}")


@pytest.mark.parametrize(("box", "why"), [
    ("a,1,5,5", r"'a,1,5,5' are not four numbers"),
    (",1,5,5", r"',1,5,5' are not four numbers"),
    ("5,1,5,9", r"\(5, 1, 5, 9\) is empty \(needs x0 < x1 and y0 < y1\)"),
    ("1,9,5,2", r"\(1, 9, 5, 2\) is empty"),
    ("-1,0,5,5", r"\(-1, 0, 5, 5\) starts outside the image"),
    ("nan,0,5,5", r"\(nan, 0, 5, 5\) is not finite"),
    ("1_0,0,5,5", r"'1_0,0,5,5' are not four numbers"),  # float() reads 10 (issue 22)
    ("\u0661,0,5,5", r"'\u0661,0,5,5' are not four numbers"),
])
def test_malformed_box_is_an_error_naming_file_and_row(tmp_path: Path, box: str, why: str) -> None:
    _boxed(tmp_path, ["0,0,16,16", "2,3,4,5", box])
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.csv'}: bad object boxes: data row 3 \(line 4\): {why}"):
        build_dataset(_cfg(tmp_path, boxes=True), "train")
    assert build_dataset(_cfg(tmp_path), "train").boxes is None  # data.boxes=false ignores the columns


def test_data_boxes_without_box_columns_is_an_error_naming_the_csv(tmp_path: Path) -> None:
    _csv_data(tmp_path, {"train": [(0, "a.png"), (1, "b.png")]})
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.csv'} has no column 'x0', 'y0', 'x1', 'y1'.*"
                                        r"data.boxes is true: add the box columns, or set data.boxes=false"):
        build_dataset(_cfg(tmp_path, boxes=True), "train")
    with pytest.raises(DataError, match="data.boxes is true but data.format is 'folder'"):
        build_dataset(_cfg(tmp_path, boxes=True, format="folder"), "train")


def test_box_past_the_image_is_an_error_naming_file_and_row(tmp_path: Path) -> None:
    """The right and bottom edges need the image size: eval_boxes reads it from the header and checks."""
    _boxed(tmp_path, ["0,0,16,16", "2,3,16.5,5"])
    with pytest.raises(DataError, match=rf"{tmp_path / 'train.csv'}, data row 2 \(line 3\): object box "
                                        r"\(2, 3, 16.5, 5\) lies outside its 16x16 image"):
        eval_boxes(build_dataset(_cfg(tmp_path, boxes=True), "train"), 16, 1.0)


def test_malformed_box_through_the_cli_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    _boxed(data, ["0,0,16,16", "4,4,2,9"])
    message = user_error(knn.main, ["--random-init", "--model", "vit_tiny_patch16_224", TINY, f"data.root={data}",
                                    "data.train_split=train", "data.test_split=train", "data.boxes=true",
                                    "data.image_size=16", "data.num_workers=0", f"output_dir={tmp_path / 'out'}"],
                         capsys)
    assert message.startswith(f"{data / 'train.csv'}: bad object boxes: data row 2 (line 3)")
