"""load_image: every PIL mode becomes 8-bit RGB with the right values; bad files raise DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sslfg.data.images import IMAGE_EXTENSIONS, DataError, has_image_extension, load_image


def _load(img: Image.Image, path: Path, **save_kwargs) -> np.ndarray:
    img.save(path, **save_kwargs)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_rgb_and_grey(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(_load(Image.fromarray(rgb), tmp_path / "a.png"), rgb)
    grey = _load(Image.new("L", (3, 2), 77), tmp_path / "g.png")
    assert (grey == 77).all()


def test_bilevel(tmp_path: Path) -> None:
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    assert _load(img, tmp_path / "b.png")[0].tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_black(tmp_path: Path, mode: str) -> None:
    colour = (200, 100, 50) if mode == "RGBA" else (200,)
    img = Image.new(mode, (3, 1))
    for x, alpha in enumerate((255, 0, 128)):
        img.putpixel((x, 0), (*colour, alpha))
    out = _load(img, tmp_path / "a.png").astype(int)
    expected = np.array(colour if mode == "RGBA" else colour * 3)
    assert np.array_equal(out[0, 0], expected)  # opaque: unchanged
    assert np.array_equal(out[0, 1], [0, 0, 0])  # transparent: black, whatever colour is stored
    assert np.abs(out[0, 2] - expected * 128 / 255).max() <= 1  # half: premultiplied


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 10, 20, 30, 200, 150, 100] + [0] * (253 * 3))
    img.putpixel((0, 0), 2)
    img.putpixel((1, 0), 1)
    assert _load(img, tmp_path / "p.png")[0].tolist() == [[200, 150, 100], [10, 20, 30]]
    out = _load(img, tmp_path / "pt.png", transparency=2)  # index 2 transparent
    assert out[0].tolist() == [[0, 0, 0], [10, 20, 30]]
    assert _load(img, tmp_path / "p.gif")[0].tolist() == [[200, 150, 100], [10, 20, 30]]


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path: Path, fmt: str) -> None:
    white = _load(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / f"w.{fmt.lower()}", format=fmt)
    assert (white >= 254).all()
    red = _load(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / f"r.{fmt.lower()}", format=fmt)
    assert np.abs(red[0, 0].astype(int) - [255, 0, 0]).max() <= 2


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    expected = [0, 1, 128, 255]
    png = Image.fromarray(values)
    assert png.mode == "I;16"
    assert _load(png, tmp_path / "a.png")[0, :, 0].tolist() == expected
    big_endian = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    big_endian.save(tmp_path / "b.tif")
    assert Image.open(tmp_path / "b.tif").mode == "I;16B"
    assert load_image(tmp_path / "b.tif").getpixel((2, 0)) == (128, 128, 128)
    # 32-bit I: read as 16-bit values, clipped to 0..65535 first.
    wide = Image.fromarray(np.array([[-5, 0, 32768, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert _load(wide, tmp_path / "c.tif")[0, :, 0].tolist() == [0, 0, 128, 255]


def test_format_detected_from_content(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "really_png.jpg", format="PNG")
    assert np.array_equal(np.asarray(load_image(tmp_path / "really_png.jpg")), rgb)


def _truncated_jpeg(path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (_truncated_jpeg, "cannot decode"),
        (lambda p: p.write_text("this is not an image\n"), "cannot decode"),
        (lambda p: p.mkdir(), "folder"),
    ],
    ids=["missing", "zero-byte", "truncated-jpeg", "text-as-png", "directory"],
)
def test_bad_files_raise_data_error_naming_the_path(tmp_path: Path, make, words: str) -> None:
    path = tmp_path / ("bad.jpg" if make is _truncated_jpeg else "bad.png")
    make(path)
    with pytest.raises(DataError, match=words) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".jfif"} <= set(IMAGE_EXTENSIONS)
    assert has_image_extension("a/B.JPG") and has_image_extension("x.Tiff")
    assert not has_image_extension("notes.txt") and not has_image_extension("jpg")
