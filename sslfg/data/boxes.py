"""Object boxes in the coordinates the model sees: through `sslfg.data.transforms.eval_transform`.

A box is (x0, y0, x1, y1) in pixels with exclusive right and bottom edges, so it is also the
continuous extent of the object (a box over pixels 2..5 is (2, 6)). The eval transform resizes
the short side to round(S / crop_ratio) (the long side to int(S·long/short), torchvision's rule)
and takes the centre S×S crop (offset round((side − S) / 2)); a box scales with the resize,
shifts by the crop offset and is clipped to the crop. A box wholly outside the crop comes back
with zero width or height.
"""

from __future__ import annotations

import torch
from PIL import ExifTags, Image

from sslfg.data.datasets import Box, CsvSplitDataset
from sslfg.data.images import DataError

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (load_image applies them)


def transform_box(box: Box, original_size: tuple[int, int], image_size: int, crop_ratio: float) -> Box:
    """`box` in pixels of an image of `original_size` (width, height) -> pixels of its eval-transformed
    image_size × image_size crop (`crop_ratio` in (0, 1]), clipped to the crop."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    width, height = original_size
    short = round(image_size / crop_ratio)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    left, top = round((new_w - image_size) / 2), round((new_h - image_size) / 2)
    sx, sy = new_w / width, new_h / height
    x0, y0, x1, y1 = box

    def clip(v: float) -> float:
        return min(max(v, 0.0), float(image_size))

    return clip(x0 * sx - left), clip(y0 * sy - top), clip(x1 * sx - left), clip(y1 * sy - top)


def loaded_size(path: str) -> tuple[int, int]:
    """(width, height) of the image at `path` as `load_image` returns it (EXIF orientation applied),
    read from the file header without decoding the pixels."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(ExifTags.Base.Orientation, 1) in _TRANSPOSED:
                width, height = height, width
    except OSError as err:  # missing, unreadable or not an image (UnidentifiedImageError is an OSError)
        raise DataError(f"cannot read the image size of {path}: {err}") from err
    return width, height


def eval_boxes(dataset: CsvSplitDataset, image_size: int, crop_ratio: float) -> torch.Tensor:
    """(N, 4) float32: every sample's box in its eval-transformed image (see the module docstring).

    DataError when the dataset has no boxes, or a box reaches past its image (naming the csv row).
    """
    if dataset.boxes is None:
        raise DataError(f"{dataset.source} was read without object boxes; set data.boxes=true and give its csv the "
                        "columns x0,y0,x1,y1 (pixels of the image).")
    out = []
    for i, box in enumerate(dataset.boxes):
        try:
            size = loaded_size(dataset.paths[i])
        except DataError as err:
            raise DataError(f"{err} (listed in {dataset.source}, data row {dataset.rows[i]})") from err
        dataset.check_box(i, size)
        out.append(transform_box(box, size, image_size, crop_ratio))
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)
