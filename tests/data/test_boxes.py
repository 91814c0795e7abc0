"""Object boxes: read from the csv layout (and from CUB's files), carried through the eval transform exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from sslfg.data.boxes import eval_boxes, transform_box
from sslfg.data.build.cub import convert_cub
from sslfg.data.datasets import build_dataset
from sslfg.data.images import DataError, loaded_size
from sslfg.data.transforms import eval_transform
from sslfg.schema import DataConfig

S = 32
SIZES = [(64, 40), (40, 64), (50, 50), (97, 31), (31, 90)]  # (width, height): wide, tall, square, extreme
CROP_RATIOS = [1.0, 0.875, 0.7]


def _box_in(width: int, height: int) -> tuple[int, int, int, int]:
    """An integer box well inside a width x height image, off centre so that a wrong crop offset shows."""
    return round(0.45 * width), round(0.15 * height), round(0.9 * width), round(0.7 * height)


@pytest.mark.parametrize("crop_ratio", CROP_RATIOS)
@pytest.mark.parametrize("size", SIZES)
def test_bright_rectangle_lands_where_the_transformed_box_says(size: tuple[int, int], crop_ratio: float) -> None:
    width, height = size
    x0, y0, x1, y1 = _box_in(width, height)
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[y0:y1, x0:x1] = 255
    out = eval_transform(S, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop_ratio)(Image.fromarray(pixels))[0]
    bx0, by0, bx1, by1 = transform_box((x0, y0, x1, y1), size, S, crop_ratio)
    centres = torch.arange(S) + 0.5
    # signed distance of each pixel centre into the box along each axis (positive inside)
    inside_x = torch.minimum(centres - bx0, bx1 - centres)
    inside_y = torch.minimum(centres - by0, by1 - centres)
    depth = torch.minimum(inside_y[:, None], inside_x[None, :])
    # resampling blurs an edge over at most one output pixel either side; beyond that the image is exact
    deep_inside, far_outside = depth >= 1, depth <= -1
    assert deep_inside.any() and far_outside.any()
    assert (out[deep_inside] > 0.99).all()
    assert (out[far_outside] < 0.01).all()
    bright = (out > 0.5).nonzero()
    edges = torch.stack([bright[:, 1].min(), bright[:, 0].min(), bright[:, 1].max() + 1, bright[:, 0].max() + 1])
    assert torch.allclose(edges.float(), torch.tensor([bx0, by0, bx1, by1]), atol=1.0)


@pytest.mark.parametrize("crop_ratio", CROP_RATIOS)
@pytest.mark.parametrize("size", SIZES)
def test_transform_box_equals_torchvisions_box_transform(size: tuple[int, int], crop_ratio: float) -> None:
    """torchvision moves BoundingBoxes through the same Resize and CenterCrop as the eval transform's image."""
    width, height = size
    boxes = [_box_in(width, height), (0, 0, width, height), (1, 2, 5, 9)]
    reference = v2.Compose([v2.Resize(round(S / crop_ratio)), v2.CenterCrop(S)])(
        tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float64), format="XYXY", canvas_size=(height, width)))
    ours = torch.tensor([transform_box(b, size, S, crop_ratio) for b in boxes])
    assert torch.allclose(ours.double(), reference.as_subclass(torch.Tensor), atol=1e-9)


def test_transform_box_by_hand() -> None:
    # 64x32 -> short side 32: unchanged, crop columns 16..47; box x 20..40 -> 4..24
    assert transform_box((20, 4, 40, 12), (64, 32), 32, 1.0) == (4, 4, 24, 12)
    # 20x40 at crop 0.5 -> 64x128, columns 16..47 and rows 48..79 kept; both axes scale by 3.2, clipped to 0..32
    assert transform_box((5, 10, 10, 30), (20, 40), 32, 0.5) == pytest.approx((0, 0, 16, 32))
    assert transform_box((0, 0, 3, 3), (20, 40), 32, 0.5) == pytest.approx((0, 0, 0, 0))  # outside the crop: empty


def _boxed_csv(root: Path, rows: list[tuple[str, tuple[int, int], str]]) -> None:
    """root/train.csv with a box column per row (text as given) and a grey image of (width, height) for each."""
    (root / "images").mkdir(parents=True)
    lines = ["class_id,dir,x0,y0,x1,y1"]
    for i, (name, (w, h), box) in enumerate(rows):
        Image.new("L", (w, h), 128).save(root / "images" / name)
        lines.append(f"{i % 2},{name},{box}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")


def test_eval_boxes_reads_sizes_and_follows_the_dataset(tmp_path: Path) -> None:
    _boxed_csv(tmp_path, [("a.png", (64, 32), "20,4,40,12"), ("b.png", (32, 32), "0,0,32,32"),
                          ("c.png", (32, 64), "8.5,16,24,48")])
    cfg = DataConfig(root=str(tmp_path), train_split="train", boxes=True)
    ds = build_dataset(cfg, "train")
    assert ds.boxes == [(20, 4, 40, 12), (0, 0, 32, 32), (8.5, 16, 24, 48)]
    boxes = eval_boxes(ds, 32, 1.0)
    assert boxes.dtype == torch.float32
    assert boxes.tolist() == [[4, 4, 24, 12], [0, 0, 32, 32], [8.5, 0, 24, 32]]
    (tmp_path / "images" / "b.png").write_bytes(b"")  # skip drops b and its box with it
    ds = build_dataset(DataConfig(root=str(tmp_path), train_split="train", boxes=True, on_bad_image="skip"), "train")
    assert ds.boxes == [(20, 4, 40, 12), (8.5, 16, 24, 48)]
    assert eval_boxes(ds, 32, 1.0).tolist() == [[4, 4, 24, 12], [8.5, 0, 24, 32]]
    assert build_dataset(DataConfig(root=str(tmp_path), train_split="train"), "train").boxes is None


def test_box_past_the_image_edge_is_an_error_naming_the_row(tmp_path: Path) -> None:
    _boxed_csv(tmp_path, [("a.png", (64, 32), "20,4,40,12"), ("b.png", (32, 20), "0,0,32,21")])
    with pytest.raises(DataError, match=r"train\.csv, data row 2 \(line 3\).*\(0, 0, 32, 21\).*32x20"):
        build_dataset(DataConfig(root=str(tmp_path), train_split="train", boxes=True), "train")  # at start-up


def test_eval_boxes_without_boxes_says_how_to_get_them(tmp_path: Path) -> None:
    _boxed_csv(tmp_path, [("a.png", (64, 32), "20,4,40,12")])
    ds = build_dataset(DataConfig(root=str(tmp_path), train_split="train"), "train")
    with pytest.raises(DataError, match="data.boxes=true"):
        eval_boxes(ds, 32, 1.0)


def test_loaded_size_applies_exif_orientation(tmp_path: Path) -> None:
    """load_image turns a photo upright, so its boxes are in upright pixels: orientations 5-8 swap the sides."""
    for orientation, expected in [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))]:
        path = tmp_path / f"{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.new("RGB", (40, 20)).save(path, exif=exif)
        assert loaded_size(str(path)) == expected


def _fake_cub(root: Path) -> None:
    """A 3-image CUB_200_2011 tree: two classes, 1-based ids, images of known sizes, one test image."""
    images = {1: ("001.Albatross/a_1.jpg", (40, 30)), 2: ("002.Auklet/b_2.jpg", (30, 50)),
              3: ("001.Albatross/a_3.jpg", (20, 20))}
    for _, (rel, size) in images.items():
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(root / "images" / rel)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, (rel, _) in images.items()))
    (root / "image_class_labels.txt").write_text("1 1\n2 2\n3 1\n")
    (root / "train_test_split.txt").write_text("1 1\n2 1\n3 0\n")
    (root / "bounding_boxes.txt").write_text("1 5.0 4.0 20.0 10.0\n2 0.0 10.0 30.0 40.0\n3 2.5 3.0 7.0 8.0\n")
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")


def test_cub_converter_writes_0_based_ids_and_xyxy_boxes(tmp_path: Path) -> None:
    _fake_cub(tmp_path)
    convert_cub(tmp_path)
    assert (tmp_path / "train_val.csv").read_text().splitlines() == [
        "class_id,dir,x0,y0,x1,y1", "0,001.Albatross/a_1.jpg,5,4,25,14", "1,002.Auklet/b_2.jpg,0,10,30,50"]
    assert (tmp_path / "test.csv").read_text().splitlines() == [
        "class_id,dir,x0,y0,x1,y1", "0,001.Albatross/a_3.jpg,2.5,3,9.5,11"]
    assert (tmp_path / "classid_classname.csv").read_text().splitlines() == [
        "class_id,class_name", "0,001.Albatross", "1,002.Auklet"]
    cfg = DataConfig(root=str(tmp_path), boxes=True)
    train = build_dataset(cfg, "train_val")
    assert train.classes == ["001.Albatross", "002.Auklet"] and train.labels == [0, 1]
    # 40x30 -> 26x20 (x by 0.65, y by 2/3), columns 3..22 kept; 30x50 -> 20x33 (y by 0.66), rows 6..25 kept
    # (round(6.5) = 6, as torchvision rounds); the second box is clipped at the crop's bottom
    expected = torch.tensor([[5 * 0.65 - 3, 4 * 2 / 3, 25 * 0.65 - 3, 14 * 2 / 3], [0, 10 * 0.66 - 6, 20, 20]])
    assert torch.allclose(eval_boxes(train, 20, 1.0), expected)
    with pytest.raises(DataError, match="train_val.csv.*already exist; remove them or choose another --out"):
        convert_cub(tmp_path)  # never overwrites


def test_cub_converter_names_the_bad_annotation(tmp_path: Path) -> None:
    _fake_cub(tmp_path)
    (tmp_path / "bounding_boxes.txt").write_text("1 5.0 4.0 20.0 10.0\n2 0.0 10.0 30.0 40.0\n")
    with pytest.raises(DataError, match=r"bounding_boxes.txt and .*images.txt list different image ids \(3\)"):
        convert_cub(tmp_path, tmp_path / "out")
    (tmp_path / "bounding_boxes.txt").write_text("1 5.0 4.0 20.0 10.0\n2 0.0 10.0 30.0 40.0\n3 a b c d\n")
    with pytest.raises(DataError, match=r"bounding_boxes.txt: image 3 has box 'a b c d'"):
        convert_cub(tmp_path, tmp_path / "out")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes.txt not found; --cub must be the CUB_200_2011 folder"):
        convert_cub(tmp_path, tmp_path / "out")
