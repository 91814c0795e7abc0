"""The start-up summary every command prints (and records in its JSON): the data it reads (with or
without object boxes), the normalisation and where it came from, the backbone's token grid, and the
schedule it will run."""

from __future__ import annotations

from typing import Any

from timm.models.vision_transformer import VisionTransformer

from sslfg.methods.local import num_kept
from sslfg.models.backbone import grid_size
from sslfg.schema import IMAGENET_MEAN, IMAGENET_STD, DataConfig

SCHEMA_DEFAULT = "schema default"


def startup_summary(data: DataConfig, datasets: dict[str, Any], sources: dict[str, str],
                    run: dict[str, Any]) -> dict[str, Any]:
    """Flat facts: data.* (root, layout, images, classes and whether it has object boxes per
    split in `datasets`, skipped images, test
    images that the training split lists too, image size, mean/std with the file or "command line" that set
    them, per `sources` from `sslfg.config.key_sources`), then the command's own `run` facts (steps, epochs,
    global batch, lr, ...)."""
    summary: dict[str, Any] = {"data.root": data.root, "data.format": data.format}
    for split, dataset in datasets.items():
        summary[f"data.{split}.images"] = len(dataset)
        summary[f"data.{split}.classes"] = len(set(dataset.labels) - {-1})
        summary[f"data.{split}.boxes"] = dataset.boxes is not None
    summary["data.skipped_images"] = sum(len(d.skipped) for d in datasets.values())
    if data.test_split in datasets:  # test images the training split lists too: metrics on them measure memory
        summary["data.test_overlaps_train"] = datasets[data.test_split].overlaps_train
    summary["data.image_size"] = data.image_size
    for key, value, imagenet in (("mean", data.mean, IMAGENET_MEAN), ("std", data.std, IMAGENET_STD)):
        summary[f"data.{key}"] = list(value)
        origin = sources.get(f"data.{key}", SCHEMA_DEFAULT)
        summary[f"data.{key}.source"] = f"{origin} (ImageNet)" if tuple(value) == imagenet else origin
    return summary | run


def key_origins(sources: dict[str, str], keys: list[str]) -> str:
    """Where `keys` came from, grouped: 'command line: data.root; runs/x/config.yaml (the run's own):
    data.format, ...; schema default: ...', per `sources` from `sslfg.config.key_sources`."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(sources.get(key, SCHEMA_DEFAULT), []).append(key)
    return "; ".join(f"{origin}: {', '.join(names)}" for origin, names in groups.items())


def token_grid(vit: VisionTransformer) -> dict[str, Any]:
    """The backbone's patch size and token grid at the run's image size (nothing for a backbone without patch
    tokens: a CNN, or raw pixels)."""
    if not isinstance(vit, VisionTransformer):
        return {}
    grid = grid_size(vit)
    return {"model.patch_size": vit.patch_embed.patch_size[0], "model.token_grid": f"{grid}x{grid} = {grid**2} patches"}


def kept_patches(vit: VisionTransformer, keep_ratio: float) -> str:
    """'K of N': the patches ⌊keep_ratio·N⌋ keeps of `vit`'s grid."""
    patches = grid_size(vit) ** 2
    return f"{num_kept(patches, keep_ratio)} of {patches}"
