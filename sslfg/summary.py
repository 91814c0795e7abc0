"""The start-up summary every command prints (and records in its JSON): the data it reads, the
normalisation and where it came from, and the schedule it will run."""

from __future__ import annotations

from typing import Any

from sslfg.schema import IMAGENET_MEAN, IMAGENET_STD, DataConfig

SCHEMA_DEFAULT = "schema default"


def startup_summary(data: DataConfig, datasets: dict[str, Any], sources: dict[str, str],
                    run: dict[str, Any]) -> dict[str, Any]:
    """Flat facts: data.* (root, layout, images and classes per split in `datasets`, skipped images, image
    size, mean/std with the file or "command line" that set them, per `sources` from
    `sslfg.config.key_sources`), then the command's own `run` facts (steps, epochs, global batch, lr, ...)."""
    summary: dict[str, Any] = {"data.root": data.root, "data.format": data.format}
    for split, dataset in datasets.items():
        summary[f"data.{split}.images"] = len(dataset)
        summary[f"data.{split}.classes"] = len(set(dataset.labels) - {-1})
    summary["data.skipped_images"] = sum(len(d.skipped) for d in datasets.values())
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
