"""The data every choice is made on, never the test split: the linear probe's lr (eval.linear) and the
study's fine-tuning init (eval.knn with knn.val=true).

`train` + data.val_split when the dataset has both (the csv layouts: train, val, train_val, test);
otherwise a stratified part of data.train_split held out, drawn from the seed (`val_fraction` of
each class). The test split is read only for the reported numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from sslfg.config import ConfigError
from sslfg.data.datasets import split_exists
from sslfg.evaluation.run import EvalDatasets, split_features
from sslfg.schema import DataConfig, EvalConfig

log = logging.getLogger(__name__)

SELECTION_TRAIN_SPLIT = "train"  # with data.val_split, the pair choices are made on (METHODS §5 csv splits)
Split = tuple[Tensor, Tensor]  # features (N, D) float, labels (N,) int64


def _has_split(data: DataConfig, split: str) -> bool:
    """Whether the split's csv file (csv layout), folder (imagefolder layout) or shard index exists."""
    return split_exists(data, split)


def selection_splits(data: DataConfig) -> tuple[str, str] | None:
    """("train", data.val_split) when the dataset has both; None: hold out of data.train_split.
    A selection split that is the test split is an error: selection never looks at test."""
    if not (_has_split(data, SELECTION_TRAIN_SPLIT) and _has_split(data, data.val_split)):
        return None
    if data.val_split == data.test_split:
        raise ConfigError(f"data.val_split: '{data.val_split}' is also data.test_split; the lr and the fine-tuning "
                          "init must be chosen without looking at the test split. Set data.val_split to a validation "
                          "split.")
    return SELECTION_TRAIN_SPLIT, data.val_split


def holdout_names(train_split: str, fraction: float, seed: int) -> tuple[str, str]:
    """(fit, selection) names of the two parts of `train_split` when the dataset has no validation split."""
    return f"{train_split} (the rest)", f"{train_split} (stratified {fraction:g} held out, seed {seed})"


def stratified_holdout(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (ascending) of the kept and the held-out samples: round(fraction · n_c) random
    samples of each class c held out, but always at least one kept. labels (N,) int64, any ids."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    _, cls = torch.unique(labels, return_inverse=True)
    order = perm[torch.argsort(cls[perm], stable=True)]  # grouped by class, random within a class
    counts = torch.bincount(cls)
    rank = torch.arange(len(labels)) - (counts.cumsum(0) - counts)[cls[order]]  # position within its class
    held = torch.minimum(torch.floor(fraction * counts + 0.5).long(), counts - 1)
    is_val = rank < held[cls[order]]
    return order[~is_val].sort().values, order[is_val].sort().values


def selection_features(cfg: EvalConfig, vit: VisionTransformer, accelerator: Accelerator, out: Path,
                       datasets: EvalDatasets, train: Split, val_fraction: float,
                       what: str) -> tuple[Split, Split, list[Any], dict[str, str]]:
    """(fit, val) features for choosing `what` (named in the log), the datasets read, and the protocol
    entries that say which splits they are. `train` is data.train_split's (features, labels), held out
    of when the dataset has no validation split."""
    d = cfg.data
    pair = selection_splits(d)
    if pair is not None:
        (*fit, fit_ds), (*val, val_ds) = (split_features(cfg, vit, accelerator, datasets, s, out) for s in pair)
        return tuple(fit), tuple(val), [fit_ds, val_ds], {"selection_split": pair[1], "selection_train_split": pair[0]}
    keep, held = stratified_holdout(train[1], val_fraction, cfg.seed)
    if len(held) == 0:
        raise ConfigError(f"linear.val_fraction: {val_fraction} of {d.train_split} ({len(train[1])} images) "
                          f"holds out no image of any class; raise it, or give the dataset a "
                          f"{SELECTION_TRAIN_SPLIT} and a {d.val_split} split")
    log.info("no %s + %s splits: choosing the %s on %d images held out of %s", SELECTION_TRAIN_SPLIT, d.val_split,
             what, len(held), d.train_split)
    fit_name, val_name = holdout_names(d.train_split, val_fraction, cfg.seed)
    return (train[0][keep], train[1][keep]), (train[0][held], train[1][held]), [], {
        "selection_split": val_name, "selection_train_split": fit_name}
