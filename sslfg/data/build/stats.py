"""Per-channel pixel mean and std of a dataset's training split, to paste into its recipe.

    python -m sslfg.data.build.stats --config configs/datasets/sample.yaml
    python -m sslfg.data.build.stats --config configs/pretrain/sample.yaml data.root=data/sample data.num_workers=0

Images are resized (shorter side) to data.image_size and centre-cropped, as RGB in [0, 1]; the std is
over every pixel of the split (population std). Prints the `data:` lines for the recipe. A channel whose
std is 0 (every pixel the same: all-black or constant images) is an error naming the data.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, v2

from sslfg.cli import parse_run_cli, run_cli
from sslfg.config import ConfigError, load_config
from sslfg.data.datasets import build_dataset, check_training_folder
from sslfg.data.images import DataError
from sslfg.schema import DataConfig, EvalConfig, FinetuneConfig, PretrainConfig

SCHEMAS = (PretrainConfig, FinetuneConfig, EvalConfig)  # a recipe of any command, or a configs/datasets file
BATCH = 64
FLAT_STD = 1e-6  # a channel std below this (pixels in [0, 1]) is a constant channel, up to rounding


def load_data_config(files: Sequence[str], overrides: Sequence[str]) -> DataConfig:
    """The data section of a recipe of any command; the error of the first schema when none fits."""
    errors = []
    for schema in SCHEMAS:
        try:
            return load_config(files, overrides, schema).data
        except ConfigError as e:
            errors.append(e)
    raise errors[0]


@torch.no_grad()
def channel_stats(data: DataConfig) -> tuple[list[float], list[float]]:
    """(mean, std) per RGB channel over every pixel of data.train_split at data.image_size."""
    transform = v2.Compose([v2.ToImage(), v2.Resize(data.image_size, InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(data.image_size), v2.ToDtype(torch.float64, scale=True)])
    check_training_folder(data)
    dataset = build_dataset(data, data.train_split, transform)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for images, _ in DataLoader(dataset, batch_size=BATCH, num_workers=data.num_workers):
        total += images.sum(dim=(0, 2, 3))
        squares += images.square().sum(dim=(0, 2, 3))
        count += images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    flat = [name for name, s in zip("RGB", std.tolist(), strict=True) if s < FLAT_STD]
    if flat:
        raise DataError(
            f"{dataset.source} (data.root {data.root}, split {data.train_split}): channel {', '.join(flat)} has the "
            f"same value ({', '.join(f'{mean[i]:.4f}' for i in map('RGB'.index, flat))}) in every pixel of its "
            f"{len(dataset)} images, so its std is 0 and normalising by it is impossible. Likely all-black or "
            "constant images (an export that lost the pixel values, a wrong bit depth): view a few of them. If a "
            "channel is truly constant, set its data.std to 1 by hand."
        )
    return mean.tolist(), std.tolist()


def yaml_lines(mean: Sequence[float], std: Sequence[float]) -> str:
    """The recipe lines that set them, 4 decimals."""
    return "\n".join(["data:", *(f"  {key}: [{', '.join(f'{v:.4f}' for v in values)}]"
                                 for key, values in (("mean", mean), ("std", std)))])


def main(argv: Sequence[str] | None = None) -> tuple[list[float], list[float]]:
    args = parse_run_cli(argv, __doc__, check=False)
    data = load_data_config(args.files, args.overrides)
    mean, std = channel_stats(data)
    print(f"# {data.root}, split {data.train_split}, at {data.image_size} px")
    print(yaml_lines(mean, std))
    return mean, std


if __name__ == "__main__":
    sys.exit(run_cli(main))
