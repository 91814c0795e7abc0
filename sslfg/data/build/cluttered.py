"""The cluttered sample: the bundled sample's garments, small, on a larger canvas among clutter, with boxes.

    python -m sslfg.data.build.cluttered [--out data/cluttered] [--per-class 1000] [--test-per-class 200]

In the style of the cluttered MNIST of the spatial-transformer literature, so that "where does the
model look?" has an answer: each image of the sample (same rows, splits and sizes as
`sslfg.data.build.sample`, from the same Fashion-MNIST files) becomes an 84x84 grey canvas with

- the 28x28 garment at a uniformly random position, wholly inside the canvas (its square is a
  ninth of the canvas);
- 4 to 6 clutter pieces: 8 to 10 px square crops of other garments of the same part (train or
  t10k), each centred on one of their non-zero pixels so it shows cloth, pasted (brightest pixel
  wins) at random positions that do not overlap the garment's box; pieces may overlap each other.

The csv files carry the garment's tight box (`x0,y0,x1,y1`, around its non-zero pixels, x1/y1
exclusive) in canvas pixels: with the clutter kept off it, the box holds exactly the garment.
Every random choice of an image comes from a generator seeded by (SEED, part, index), so the
output is the same bytes on every run and independent of thread scheduling. Output layout and
build (temporary folder, marker, rebuild on other parameters) are those of `sslfg.data.build.sample`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sslfg.data.build.sample import (
    SEED,
    SOURCE_FILES,
    SYSTEM_DIR,
    Parts,
    Render,
    Row,
    build_from_fashion_mnist,
    command_line,
)
from sslfg.data.datasets import BOX_COLUMNS
from sslfg.data.images import DataError

CANVAS = 84  # 3 x 28: the garment's square covers a ninth of the canvas; patch 12 keeps the demo's 7x7 grid
PIECES = (4, 6)  # clutter pieces per image, inclusive range
PIECE_SIDE = (8, 10)  # clutter piece side in px, inclusive range
_PART_IDS = {part: i for i, part in enumerate(SOURCE_FILES)}

Box = tuple[int, int, int, int]


def prepare_cluttered(
    out_dir: str | os.PathLike[str],
    per_class: int = 1000,
    test_per_class: int = 200,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    system_dir: str | os.PathLike[str] = SYSTEM_DIR,
) -> Path:
    """Build the cluttered sample in `out_dir` (arguments as `sslfg.data.build.sample.prepare_sample`)."""
    params = {"dataset": "fashion-mnist-cluttered", "licence": "MIT (Zalando Research)", "canvas": CANVAS,
              "pieces": list(PIECES), "piece_side": list(PIECE_SIDE)}
    return build_from_fashion_mnist(out_dir, params, per_class, test_per_class, _renderer, BOX_COLUMNS,
                                    cache_dir=cache_dir, system_dir=system_dir, builder="sslfg.data.build.cluttered")


def _renderer(data: Parts) -> Render:
    def render(row: Row) -> tuple[np.ndarray, Box]:
        _, part, index = row
        rng = np.random.default_rng([SEED, _PART_IDS[part], index])
        try:
            return cluttered_image(data[part][0], index, rng)
        except ValueError as err:
            raise DataError(f"Fashion-MNIST {part} image {index}: {err}") from err

    return render


def cluttered_image(garments: np.ndarray, index: int, rng: np.random.Generator) -> tuple[np.ndarray, Box]:
    """`garments[index]` (of (N, h, w) uint8) on a CANVAS x CANVAS canvas among clutter from the other garments
    (see the module docstring) -> (canvas uint8, the garment's tight box in canvas pixels)."""
    garment = garments[index]
    h, w = garment.shape
    canvas = np.zeros((CANVAS, CANVAS), np.uint8)
    top, left = (int(v) for v in rng.integers(0, (CANVAS - h + 1, CANVAS - w + 1)))
    canvas[top:top + h, left:left + w] = garment
    x0, y0, x1, y1 = tight_box(garment)
    box = (left + x0, top + y0, left + x1, top + y1)
    for _ in range(rng.integers(PIECES[0], PIECES[1] + 1)):
        other = int(rng.integers(len(garments) - 1))
        other += other >= index  # any garment but this one
        side = int(rng.integers(PIECE_SIDE[0], PIECE_SIDE[1] + 1))
        piece = _piece(garments[other], side, rng)
        y, x = _free_spot(side, box, rng)
        np.maximum(canvas[y:y + side, x:x + side], piece, out=canvas[y:y + side, x:x + side])
    return canvas, box


def tight_box(image: np.ndarray) -> Box:
    """(x0, y0, x1, y1) around the non-zero pixels of a 2-D image, x1/y1 exclusive; ValueError if there are none."""
    ys, xs = np.nonzero(image)
    if not len(ys):
        raise ValueError("the image is black, so it has no object box")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _piece(garment: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A side x side crop of `garment` centred (as far as its edges allow) on a random non-zero pixel."""
    ys, xs = np.nonzero(garment)
    if not len(ys):  # a black garment gives black clutter
        return garment[:side, :side]
    k = rng.integers(len(ys))
    y = int(np.clip(ys[k] - side // 2, 0, garment.shape[0] - side))
    x = int(np.clip(xs[k] - side // 2, 0, garment.shape[1] - side))
    return garment[y:y + side, x:x + side]


def _free_spot(side: int, box: Box, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly random top-left (y, x) of a side x side square inside the canvas that does not overlap `box`."""
    x0, y0, x1, y1 = box
    starts = np.arange(CANVAS - side + 1)
    clear_x = (starts + side <= x0) | (starts >= x1)
    clear_y = (starts + side <= y0) | (starts >= y1)
    ys, xs = np.nonzero(clear_y[:, None] | clear_x[None, :])  # a box of at most 28 px always leaves room
    k = rng.integers(len(ys))
    return int(ys[k]), int(xs[k])


def main(argv: list[str] | None = None) -> None:
    """Command line: build the cluttered sample and print its folder."""
    command_line(argv, "sslfg.data.build.cluttered", __doc__, "data/cluttered", prepare_cluttered)


if __name__ == "__main__":
    main()
