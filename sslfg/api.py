"""The Python API: what a notebook needs, through the same code paths as the commands (same checks, same files
in the run folder, same numbers), returning Python objects instead of printing them.

    import sslfg
    cfg = sslfg.load_recipe("configs/pretrain/sample.yaml", "train.epochs=1", "output_dir=runs/nb")
    run = sslfg.run_pretraining(cfg)                        # the run directory
    knn = sslfg.evaluate_knn(run, "knn.ks=[20]")            # what <run>/eval/knn.json holds
    probe = sslfg.evaluate_linear(run)
    features, images = sslfg.embed_images(run, split="test")  # (N, D) array, one dict per row of images.csv
    model, transform = sslfg.load_backbone(run), sslfg.load_transform(run)

Overrides are the commands' `key=value` strings; errors are the commands' ConfigError / DataError, raised.
The functions are not named after the modules (sslfg.pretrain, sslfg.evaluation.embed, ...), which an import of those
modules would replace as attributes of the package.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torchvision.transforms import v2

from sslfg.config import load_config
from sslfg.engine.rundir import release_run_dirs
from sslfg.schema import EvalConfig, PretrainConfig

T = TypeVar("T")


def load_recipe(path: str | Path | None, *overrides: str, schema: type[T] = PretrainConfig) -> T:
    """A recipe (with its `_base_` files) and `key=value` overrides as a checked config; `schema` is
    PretrainConfig for train_ssl.py recipes, EvalConfig or FinetuneConfig for the others."""
    return load_config(path, list(overrides), schema)


def run_pretraining(recipe: PretrainConfig | str | Path, *overrides: str) -> Path:
    """Runs (or with `resume=auto`, continues) a pretraining run; returns its run directory."""
    from sslfg.pretrain import pretrain

    if overrides and isinstance(recipe, PretrainConfig):
        raise TypeError("overrides go with a recipe path; set the fields of a loaded config directly")
    cfg = recipe if isinstance(recipe, PretrainConfig) else load_recipe(recipe, *overrides)
    return _command(lambda _: pretrain(cfg), [])


def _evaluation_argv(checkpoint: str | Path, overrides: tuple[str, ...], dataset: str | Path | None) -> list[str]:
    return ["--checkpoint", str(checkpoint), *(["--dataset", str(dataset)] if dataset else []), *overrides]


def _command(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
    """A command's `main`, its output folders released at the end as the command line does (a notebook
    that lives on must not keep another process out of them)."""
    try:
        return main(argv)
    finally:
        release_run_dirs()


def evaluate_knn(checkpoint: str | Path, *overrides: str, dataset: str | Path | None = None) -> dict[str, Any]:
    """eval.knn on a run directory or weights file (`dataset`: a dataset recipe, else the run's own data)."""
    from sslfg.commands import knn

    return _command(knn.main, _evaluation_argv(checkpoint, overrides, dataset))


def evaluate_linear(checkpoint: str | Path, *overrides: str, dataset: str | Path | None = None) -> dict[str, Any]:
    """eval.linear (the fast probe unless `linear.mode=full`), as `evaluate_knn`."""
    from sslfg.commands import linear

    return _command(linear.main, _evaluation_argv(checkpoint, overrides, dataset))


def embed_images(checkpoint: str | Path, *overrides: str, split: str | None = None,
                 dataset: str | Path | None = None) -> tuple[np.ndarray, list[dict[str, str]]]:
    """eval.embed, then its shards read back: the (N, D) features in dataset order and images.csv's rows
    (index, path, and label when known; from the shards layout index, shard, member and label). The files stay in
    the output folder (`output_dir=` to choose it)."""
    from sslfg.commands import embed

    argv = _evaluation_argv(checkpoint, overrides, dataset) + (["--split", split] if split else [])
    manifest = _command(embed.main, argv)
    out = Path(manifest["output_dir"])
    features = np.concatenate([np.load(out / shard["file"]) for shard in manifest["shards"]])
    with open(out / "images.csv", newline="", encoding="utf-8") as f:
        return features, list(csv.DictReader(f))


def load_transform(checkpoint: str | Path, *overrides: str) -> v2.Compose:
    """The evaluation transform the commands apply to a run's images (its data.image_size, mean, std and
    features.crop_ratio): PIL image -> normalised (3, S, S) tensor for `load_backbone(run)`."""
    from sslfg.data.transforms import eval_transform
    from sslfg.evaluation.run import run_data_defaults

    cfg = run_data_defaults(load_config(None, [f"checkpoint={checkpoint}", *overrides], EvalConfig))[0]
    return eval_transform(cfg.data.image_size, cfg.data.mean, cfg.data.std, cfg.features.crop_ratio)
