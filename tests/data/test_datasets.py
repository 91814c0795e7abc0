"""Csv-split, ImageFolder and unlabelled datasets: listing, labels, and fail-fast validation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslfg.data.datasets import (
    CsvSplitDataset,
    ImageFolderDataset,
    UnlabelledFolderDataset,
    build_dataset,
    check_training_folder,
)
from sslfg.data.images import DataError
from sslfg.schema import DataConfig


def _image(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), (value, value, value)).save(path)
    return path


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def csv_root(tmp_path: Path) -> Path:
    """root/images/{a,b}/*.png listed by train.csv (extra column, columns in another order)."""
    for rel, value in [("a/0.png", 10), ("a/1.png", 20), ("b/2.png", 30)]:
        _image(tmp_path / "images" / rel, value)
    _csv(tmp_path / "train.csv", "dir,extra,class_id\na/0.png,x,0\n\nb/2.png,y,2\na/1.png,z,0\n")
    return tmp_path


def test_csv_dataset_reads_labels_paths_and_images(csv_root: Path) -> None:
    ds = CsvSplitDataset(str(csv_root), "train", num_classes=3)
    assert len(ds) == 3
    assert ds.labels == [0, 2, 0]
    assert ds.paths == [str(csv_root / "images" / rel) for rel in ("a/0.png", "b/2.png", "a/1.png")]
    assert ds.num_classes == 3 and ds.classes == ["0", "1", "2"]
    img, label = ds[1]
    assert label == 2 and img.mode == "RGB" and img.getpixel((0, 0)) == (30, 30, 30)
    with_transform = CsvSplitDataset(str(csv_root), "train", num_classes=3, transform=lambda im: np.asarray(im).mean())
    assert with_transform[2] == (20.0, 0)
    assert pickle.loads(pickle.dumps(ds)).paths == ds.paths  # DataLoader workers


def test_csv_class_names_file(csv_root: Path) -> None:
    _csv(csv_root / "classid_classname.csv", "class_id,class_name\n1,beta\n0,alpha\n2,gamma\n")
    ds = CsvSplitDataset(str(csv_root), "train")
    assert ds.classes == ["alpha", "beta", "gamma"] and ds.num_classes == 3
    with pytest.raises(DataError, match="classid_classname.csv lists 3 classes but num_classes is 5"):
        CsvSplitDataset(str(csv_root), "train", num_classes=5)


def test_missing_csv_lists_existing_splits(csv_root: Path) -> None:
    _csv(csv_root / "test.csv", "class_id,dir\n0,a/0.png\n")
    with pytest.raises(DataError, match=r"'val' is not a split of .* \(no val\.csv there; its csv splits: test, "
                                        r"train\)"):
        CsvSplitDataset(str(csv_root), "val")


@pytest.mark.parametrize("kind", ["folder", "dangling link"])
def test_a_split_csv_that_is_a_folder_or_a_dangling_link_is_named_so(kind: str, csv_root: Path) -> None:
    """Old code: "'test' is not a split ... (no test.csv there; its csv splits: test, train)", contradicting
    itself, and naming `split:` instead of the key that chose it."""
    target = csv_root / "test.csv"
    if kind == "folder":
        target.mkdir()
        expected = rf"data.test_split: {target} is a folder, not the split's .csv file; move it away or rename it"
    else:
        target.symlink_to(csv_root / "gone.csv")
        expected = (rf"data.test_split: {target} is a link to {csv_root / 'gone.csv'}, which does not exist; point "
                    "it at the split's file or remove it")
    cfg = DataConfig(root=str(csv_root), train_split="train", test_split="test")
    with pytest.raises(DataError) as info:
        build_dataset(cfg, "test")
    assert str(info.value) == expected
    _csv(csv_root / "val.csv", "class_id,dir\n0,a/0.png\n")
    with pytest.raises(DataError, match=r"'nope' is not a split of .* its csv splits: train, val\)"):
        build_dataset(cfg, "nope")  # the folder or link is not listed as a split


def test_missing_column(csv_root: Path) -> None:
    _csv(csv_root / "bad.csv", "label,dir\n0,a/0.png\n")
    with pytest.raises(DataError, match=r"bad\.csv has no column 'class_id'"):
        CsvSplitDataset(str(csv_root), "bad")


def test_empty_split(csv_root: Path) -> None:
    _csv(csv_root / "empty.csv", "class_id,dir\n")
    with pytest.raises(DataError, match=r"empty\.csv has a header but no data rows"):
        CsvSplitDataset(str(csv_root), "empty")
    _csv(csv_root / "blank.csv", "")
    with pytest.raises(DataError, match=r"blank\.csv is empty"):
        CsvSplitDataset(str(csv_root), "blank")


@pytest.mark.parametrize(
    "value, num_classes, words",
    [
        ("3", 3, r"class_id 3 is outside \[0, 3\)"),
        ("-1", 0, "class_id -1 is negative"),
        ("1.5", 0, "'1.5' is not a class id"),
        ("", 0, "'' is not a class id"),
    ],
)
def test_bad_class_id_names_file_row_and_value(
    csv_root: Path, value: str, num_classes: int, words: str
) -> None:
    _csv(csv_root / "bad.csv", f"class_id,dir\n0,a/0.png\n{value},a/1.png\n")
    with pytest.raises(DataError, match=words) as info:
        CsvSplitDataset(str(csv_root), "bad", num_classes=num_classes)
    message = str(info.value)
    assert str(csv_root / "bad.csv") in message and "data row 2 (line 3)" in message


def test_missing_images_are_all_counted(csv_root: Path) -> None:
    rows = "".join(f"0,a/missing{i}.png\n" for i in range(7))
    _csv(csv_root / "bad.csv", f"class_id,dir\n0,a/0.png\n{rows}1,nofolder/x.png\n")
    with pytest.raises(DataError) as info:
        CsvSplitDataset(str(csv_root), "bad")
    message = str(info.value)
    assert str(csv_root / "bad.csv") in message and "of 9 listed images, 8 do not exist" in message
    assert f"data row 2 (line 3): {csv_root / 'images' / 'a' / 'missing0.png'}" in message
    assert "and 3 more" in message


def test_unreadable_image_names_file_csv_and_row(csv_root: Path) -> None:
    (csv_root / "images" / "b" / "2.png").write_text("not a png")
    ds = CsvSplitDataset(str(csv_root), "train", num_classes=3)
    with pytest.raises(DataError) as info:
        ds[1]
    message = str(info.value)
    assert str(csv_root / "images" / "b" / "2.png") in message
    assert str(csv_root / "train.csv") in message and "data row 2 (line 4)" in message


def _folder_tree(root: Path) -> None:
    _image(root / "train" / "b_cls" / "z.png")
    _image(root / "train" / "a_cls" / "sub" / "deep" / "y.JPG")
    _image(root / "train" / "a_cls" / "x.png")
    (root / "train" / "a_cls" / "notes.txt").write_text("ignored")
    _image(root / "train" / "a_cls" / ".hidden.png")
    _image(root / "train" / ".cache" / "h.png")


def test_image_folder(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    ds = ImageFolderDataset(str(tmp_path), "train")
    assert ds.classes == ["a_cls", "b_cls"] and ds.num_classes == 2
    split = tmp_path / "train"
    expected = ["a_cls/sub/deep/y.JPG", "a_cls/x.png", "b_cls/z.png"]
    assert ds.paths == [str(split / rel) for rel in expected]
    assert ds.labels == [0, 0, 1]
    assert ds[2][1] == 1
    with pytest.raises(DataError, match=r"split: 'test' is not a split of .* \(no test/ there; its imagefolder "
                                        r"splits: train\); set the split to one of them"):
        ImageFolderDataset(str(tmp_path), "test")
    (split / "c_empty").mkdir()
    with pytest.raises(DataError, match="c_empty"):
        ImageFolderDataset(str(tmp_path), "train")


def test_unlabelled_folder(tmp_path: Path) -> None:
    _folder_tree(tmp_path)
    ds = UnlabelledFolderDataset(str(tmp_path))
    assert [Path(p).relative_to(tmp_path).as_posix() for p in ds.paths] == [
        "train/a_cls/sub/deep/y.JPG",
        "train/a_cls/x.png",
        "train/b_cls/z.png",
    ]
    assert ds.labels == [-1, -1, -1] and ds.classes == [] and ds.num_classes == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        UnlabelledFolderDataset(str(tmp_path / "empty"))


def test_the_folder_format_refuses_a_labelled_datasets_root_and_broken_links(csv_root: Path, tmp_path: Path) -> None:
    """data.format=folder on a csv or imagefolder dataset read its test images for pretraining, and a link to a
    missing file was listed as an image (the run then stopped mid-epoch)."""
    folders = tmp_path / "folders"
    _folder_tree(folders)
    (folders / "test").mkdir()
    _csv(csv_root / "test.csv", "dir,class_id\na/0.png,0\n")
    for root, held_out in ((csv_root, "test.csv"), (folders, "test")):
        with pytest.raises(DataError, match=rf"holds {held_out}: held-out splits .* data.format=folder reads "
                                            "every image under it"):
            check_training_folder(DataConfig(root=str(root), format="folder"))
        check_training_folder(DataConfig(root=str(root), format="csv" if root == csv_root else "imagefolder"))
        assert len(UnlabelledFolderDataset(str(root))) > 0  # embedding such a root is fine
    train = folders / "train"
    (train / "a_cls" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"1 image name\(s\) are links to files that do not exist: .*gone.png -> "):
        UnlabelledFolderDataset(str(train))
    with pytest.raises(DataError, match="gone.png"):
        ImageFolderDataset(str(folders), "train")


def test_build_dataset_dispatch(csv_root: Path, tmp_path: Path) -> None:
    assert isinstance(build_dataset(DataConfig(root=str(csv_root), num_classes=3), "train"), CsvSplitDataset)
    folder_root = tmp_path / "folders"
    _folder_tree(folder_root)
    ds = build_dataset(DataConfig(root=str(folder_root), format="imagefolder"), "train", transform=str)
    assert isinstance(ds, ImageFolderDataset) and ds.transform is str
    unlabelled = build_dataset(DataConfig(root=str(folder_root), format="folder"), "ignored")
    assert isinstance(unlabelled, UnlabelledFolderDataset)
    with pytest.raises(DataError, match="2 class folders but data.num_classes is 5"):
        build_dataset(DataConfig(root=str(folder_root), format="imagefolder", num_classes=5), "train")
    with pytest.raises(DataError, match=r"class_id 2 is outside \[0, 2\)"):
        build_dataset(DataConfig(root=str(csv_root), num_classes=2), "train")


def test_build_dataset_root_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.root must be set"):
        build_dataset(DataConfig(), "train")
    with pytest.raises(DataError, match=f"data.root does not exist.*{tmp_path / 'nope'}"):
        build_dataset(DataConfig(root=str(tmp_path / "nope")), "train")
