"""Image decoding: every file a dataset lists becomes an 8-bit RGB PIL image, or a DataError.

Decoding is strict: `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is left at its default (False), so a
truncated JPEG raises instead of silently training on a half-grey picture.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image, ImageOps
from PIL.ExifTags import Base as ExifTag

# The extensions every layout finds images by: the raster formats PIL decodes itself (the csv layout
# loads any file PIL reads, whatever its name, so the folder layouts must not drop what it accepts).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".webp", ".tif", ".tiff", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".pcx", ".sgi", ".qoi",
)

# 16-bit and 32-bit integer greyscale modes; they hold more than 8 bits and need rescaling,
# because PIL's own convert("L") clips everything above 255 to white.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (load_image applies them)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# What a corrupt file can raise while PIL identifies or decodes it.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
# The default of data.max_image_pixels: PIL's own refusal threshold (it warns above MAX_IMAGE_PIXELS and
# refuses above twice that). load_image checks the limit itself, so PIL's process-wide guard is switched
# off: a recipe's data.max_image_pixels then applies to its own datasets without a global setting.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
Image.MAX_IMAGE_PIXELS = None


class DataError(ValueError):
    """A problem with the user's data (path, csv, image file); the message says what to fix."""


def has_image_extension(path: str) -> bool:
    """True if `path` ends with one of IMAGE_EXTENSIONS (case-insensitive)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file; returns a new mode "RGB" (8 bits per channel) image.

    An image of more than `max_pixels` pixels (`data.max_image_pixels`) is refused from its header,
    before it is decoded: the decompression-bomb guard.

    The format is detected from the content, not the extension (a PNG named .jpg loads). An EXIF
    orientation tag (phone and camera photos) is applied, so the image is upright as a viewer shows it.
    Conversions to RGB:
    - L, 1 (bilevel), CMYK, YCbCr, palette P without transparency: PIL's standard conversion;
      grey is replicated to three channels.
    - Transparency (RGBA, LA, PA, or P/L/RGB with a transparent colour): composited onto
      black, i.e. the colour is multiplied by alpha, so fully transparent pixels are black
      whatever colour the file stores under them.
    - 16-bit greyscale (I;16, I;16B, ...) and 32-bit integer I: treated as 16-bit values,
      clipped to 0..65535 and scaled linearly to 0..255 (65535 -> 255, 32768 -> 128).
    - Float F (e.g. 32-bit float TIFFs): values in [0, 1] are scaled to 0..255 (1.0 -> 255); otherwise
      values in [0, 255] are taken as 8-bit levels (rounded); any other range (negative, above 255, NaN)
      is a DataError naming the file, as there is no way to tell what the numbers mean.
    - Animated GIF / multi-page TIFF: the first frame.

    Raises:
        DataError: the file is missing, empty, truncated, not an image, or has more than
            `max_pixels` pixels; the message names the path.
    """
    path = os.fspath(path)
    try:
        return _decode(path, path, max_pixels)
    except DataError:  # decoded, and too large or its pixels out of range: the message says what to do
        raise
    except _DECODE_ERRORS as err:
        raise _load_error(path, err) from err


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS,
                 fix: str = "write the shards again from the original files") -> Image.Image:
    """`load_image` for the bytes of an image file (a shard member), called `name` in messages, which end with
    `fix` for a file that does not decode."""
    try:
        return _decode(io.BytesIO(data), name, max_pixels)
    except DataError:
        raise
    except _DECODE_ERRORS as err:
        raise DataError(f"cannot decode image {name} ({len(data)} bytes): {type(err).__name__}: {err}. It is "
                        f"truncated, corrupt or not an image; {fix}.") from err


def _decode(source: str | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    """The RGB image of `source` (see `load_image`); DataError naming `name` if too large or unreadable as pixels."""
    try:
        with Image.open(source) as img:
            if img.width * img.height > max_pixels:
                raise DataError(f"a {img.width}x{img.height} image ({img.width * img.height:,} pixels), more than "
                                f"data.max_image_pixels = {max_pixels:,} allows (a guard against decompression "
                                "bombs); raise data.max_image_pixels if the file is trusted, or resize it")
            img.load()
            return _to_rgb(_upright(img))
    except DataError as err:  # too large, or decoded but the pixels cannot be read as an image
        raise DataError(f"{name} is {err}") from None


def _upright(img: Image.Image) -> Image.Image:
    """`img` rotated / mirrored as its EXIF orientation tag says; `img` itself when there is none."""
    if img.getexif().get(ExifTag.Orientation, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any PIL mode to a new RGB image (see `load_image`)."""
    mode = img.mode
    if mode in ("P", "L", "RGB") and "transparency" in img.info:  # a transparent colour (tRNS)
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size)  # black
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    if mode in _WIDE_INT_MODES:
        values = np.asarray(img).astype(np.int64).clip(0, 65535)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # rounded, exact at 0 and 65535
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_levels(np.asarray(img, dtype=np.float64))).convert("RGB")
    return img.convert("RGB")  # a copy for RGB: the caller closes the file-backed original


def _float_levels(values: np.ndarray) -> np.ndarray:
    """Float pixels -> uint8 levels (see `load_image`): PIL's own conversion would clip a [0, 1] image to black."""
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(values).all() and 0 <= low and high <= 255):
        raise DataError(f"a float image with values in [{low:g}, {high:g}]; float images must hold values in "
                        "[0, 1] (scaled to 0..255) or [0, 255] (8-bit levels): rescale it to one of them, or save it "
                        "as an 8- or 16-bit image")
    scale = 255 if high <= 1 else 1
    return np.rint(values * scale).astype(np.uint8)


def _load_error(path: str, err: BaseException) -> DataError:
    """The DataError for a file that could not be decoded, with the most specific reason."""
    if not os.path.exists(path):
        return DataError(f"image file not found: {path}. Check the path (and the dataset root).")
    if os.path.isdir(path):
        return DataError(f"expected an image file but found a folder: {path}")
    if isinstance(err, PermissionError):
        return DataError(f"no permission to read image file {path}. Fix the file's permissions.")
    if os.path.getsize(path) == 0:
        return DataError(f"image file is empty (0 bytes): {path}. Re-copy or re-download it.")
    return DataError(
        f"cannot decode image file {path}: {type(err).__name__}: {err}. The file is truncated, corrupt or "
        "not an image; re-encode or re-download it, or remove it from the dataset."
    )


def loaded_size(path: str) -> tuple[int, int]:
    """(width, height) of the image at `path` as `load_image` returns it (EXIF orientation applied),
    read from the file header without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(ExifTag.Orientation, 1) in _TRANSPOSED:
                width, height = height, width
    except OSError as err:  # missing, unreadable or not an image (UnidentifiedImageError is an OSError)
        raise DataError(f"cannot read the image size of {path}: {err}") from err
    return width, height
