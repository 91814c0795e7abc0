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

from sslfg.data.datasets import Box, CsvSplitDataset
from sslfg.data.images import DataError


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


def eval_boxes(dataset: CsvSplitDataset, image_size: int, crop_ratio: float) -> torch.Tensor:
    """(N, 4) float32: every sample's box in its eval-transformed image (see the module docstring).

    DataError when the dataset has no boxes (a box past its image is an error when the dataset is built).
    """
    if dataset.boxes is None:
        raise DataError(f"{dataset.source} was read without object boxes; set data.boxes=true and give its csv the "
                        "columns x0,y0,x1,y1 (pixels of the image).")
    assert dataset.sizes is not None  # read, and the boxes checked against them, when the dataset was built
    out = [transform_box(box, size, image_size, crop_ratio) for box, size in zip(dataset.boxes, dataset.sizes,
                                                                                 strict=True)]
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)
