"""Linear probe on a frozen backbone (METHODS §4), in two modes.

- fast (the DINOv2 idea): on cached features, one Linear(D, C) per learning rate in `linear.lrs`, all
  trained at once on the same batches; the lr with the best top-1 on a validation split (never the
  test split) is retrained on the train split and scored on the test split.
- full (the LoDisc recipe): RandomResizedCrop + flip of the images every epoch through the frozen
  backbone, one head at lr = linear.lr · batch / 256 (no sweep), run by the shared training loop,
  so it checkpoints every epoch and resumes exactly.

Both modes: heads initialised N(0, 0.01) with zero bias, SGD with momentum, weight decay on the
weights only, a cosine lr schedule per step down to 0, and every lr scaled by global batch / 256.
The head sees the pooled feature as extracted (`features.kind`; CLS after the backbone's final
LayerNorm by default), not L2-normalised: the same input in both modes, as in LoDisc, and the
final LayerNorm already keeps its scale near 1. Class ids may have gaps; the fast mode maps them to
contiguous indices (a test class absent from training counts as an error).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslfg.config import ConfigError
from sslfg.data.datasets import build_dataset
from sslfg.data.loader import sample_seed
from sslfg.data.transforms import crop_flip_transform
from sslfg.engine.loop import LoopState
from sslfg.engine.run import open_run
from sslfg.engine.schedules import cosine_schedule
from sslfg.evaluation import skipped_images, split_features
from sslfg.features import feature_precision, pool_features
from sslfg.schema import DataConfig, EvalConfig, LinearConfig, LoopConfig

log = logging.getLogger(__name__)

INIT_STD = 0.01
SELECTION_TRAIN_SPLIT = "train"  # with data.val_split, the pair the fast mode selects on (METHODS §5 csv splits)
FULL_RUN_DIR = "linear_full"  # full mode's run directory inside the eval output folder
EVAL_CHUNK = 4096  # features per scoring block: bounds the (L, chunk, C) logits

Split = tuple[Tensor, Tensor]  # features (N, D) float, labels (N,) int64


class LinearHeads(nn.Module):
    """L independent classifiers Linear(D, C) on the same input: x (B, D) → logits (L, B, C).

    Every head starts from the same N(0, 0.01) weights drawn from `seed` and a zero bias, so the
    heads of a sweep differ only by their lr. Each head's weight (D, C) and bias (C,) are separate
    parameters, so each can be its own optimizer param group (its own lr); `forward` stacks them
    into one batched matmul.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1, seed: int = 0) -> None:
        super().__init__()
        weight = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(seed)) * INIT_STD
        self.weights = nn.ParameterList(nn.Parameter(weight.clone()) for _ in range(num_heads))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads))

    def forward(self, x: Tensor) -> Tensor:
        w = torch.stack(list(self.weights))  # (L, D, C)
        b = torch.stack(list(self.biases)).unsqueeze(1)  # (L, 1, C)
        return torch.baddbmm(b, x.unsqueeze(0).expand(len(w), -1, -1), w)

    def param_groups(self, lrs: Sequence[float], weight_decay: float) -> list[dict[str, Any]]:
        """Two groups per head, lr `lrs[l]` (kept as "head_lr" for schedules): the weight with
        `weight_decay`, the bias without (`wd_scale` 0 tells run_loop the same)."""
        groups = []
        for w, b, lr in zip(self.weights, self.biases, lrs, strict=True):
            groups.append({"params": [w], "lr": lr, "head_lr": lr, "weight_decay": weight_decay, "wd_scale": 1.0})
            groups.append({"params": [b], "lr": lr, "head_lr": lr, "weight_decay": 0.0, "wd_scale": 0.0})
        return groups


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Index batches (int64) of one fast-mode epoch: a permutation of range(n) drawn from (seed, epoch)
    only, cut into `batch_size` pieces; the last one may be smaller (no sample is dropped)."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return list(torch.randperm(n, generator=g).split(batch_size))


def train_heads(features: Tensor, labels: Tensor, num_classes: int, lrs: Sequence[float], epochs: int,
                batch_size: int, momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0) -> LinearHeads:
    """One head per lr, trained at once: the same init, batches (`epoch_batches`) and schedule.

    features (N, D) float and labels (N,) int64 in [0, C), on one device (the heads go there).
    Step t uses lr_l · cosine(1 → 0)[t]. The loss is the sum over heads of each head's mean cross-
    entropy, so the gradient of head l is exactly that of its own loss: the result equals L
    separate runs (up to float rounding).
    """
    heads = LinearHeads(features.shape[1], num_classes, len(lrs), seed).to(features.device)
    optimizer = torch.optim.SGD(heads.param_groups(lrs, weight_decay), lr=lrs[0], momentum=momentum)
    schedule = cosine_schedule(1.0, 0.0, epochs * math.ceil(len(features) / batch_size))
    step = 0
    for epoch in range(epochs):
        for idx in epoch_batches(len(features), batch_size, seed, epoch):
            idx = idx.to(features.device)
            for group in optimizer.param_groups:
                group["lr"] = group["head_lr"] * float(schedule[step])
            logits = heads(features[idx])  # (L, B, C)
            target = labels[idx].repeat(len(lrs))
            loss = F.cross_entropy(logits.flatten(0, 1), target, reduction="sum") / len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return heads


@torch.no_grad()
def head_accuracy(heads: LinearHeads, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Top-1 and top-5 accuracy of each head, (L,) float each, in [0, 1].

    features (N, D), N > 0; labels (N,) head indices, -1 for a class the heads never saw (always
    wrong). A row whose logits are not finite (a diverged head) counts as wrong. Top-5 is top-C
    when C < 5.
    """
    hits = torch.zeros(2, len(heads.weights), dtype=torch.float64, device=features.device)
    for x, y in zip(features.split(EVAL_CHUNK), labels.split(EVAL_CHUNK), strict=True):
        logits = heads(x)  # (L, b, C)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]  # (L, b, k)
        finite = torch.isfinite(logits).all(dim=-1)
        hits[0] += (top[..., 0] & finite).sum(dim=1)
        hits[1] += (top.any(dim=-1) & finite).sum(dim=1)
    return hits[0] / len(features), hits[1] / len(features)


def contiguous_labels(labels: Tensor, classes: Tensor) -> Tensor:
    """Class ids (N,) → their index in `classes` (sorted unique ids, (C,)); -1 for an id not in it."""
    idx = torch.searchsorted(classes, labels).clamp(max=len(classes) - 1)
    return torch.where(classes[idx] == labels, idx, -1)


def fit_and_score(train: Split, test: Split, lrs: Sequence[float], lin: LinearConfig,
                  seed: int) -> tuple[Tensor, Tensor]:
    """Trains one head per (scaled) lr on `train` and scores each on `test`: top-1, top-5, (L,) each."""
    classes = torch.unique(train[1])
    heads = train_heads(train[0], contiguous_labels(train[1], classes), len(classes), lrs, lin.epochs,
                        lin.batch_size, lin.momentum, lin.weight_decay, seed)
    return head_accuracy(heads, test[0], contiguous_labels(test[1], classes))


@dataclass
class FastProbeResult:
    """What `fast_probe` chose and measured."""

    lr: float  # the chosen lr, as listed in linear.lrs (before the batch / 256 scaling)
    val_top1: dict[float, float]  # validation top-1 of every swept lr
    top1: float  # test accuracy of the chosen lr retrained on the train split
    top5: float


def fast_probe(fit: Split, val: Split, train: Split, test: Split, lin: LinearConfig, seed: int = 0) -> FastProbeResult:
    """The fast linear probe on feature tensors (all on one device).

    Sweeps `lin.lrs` (each · batch / 256) on `fit`, picks the best top-1 on `val` (ties: the lr
    listed first), retrains that lr on `train` and scores it on `test`. `test` is used only after
    the choice; `fit`/`val` and `train` may overlap (train = fit ∪ val usually).
    """
    check_settings(lin)
    scale = lin.batch_size / 256
    val_top1, _ = fit_and_score(fit, val, [lr * scale for lr in lin.lrs], lin, seed)
    best = int(val_top1.argmax())  # first of equal maxima
    top1, top5 = fit_and_score(train, test, [lin.lrs[best] * scale], lin, seed)
    return FastProbeResult(lin.lrs[best], dict(zip(lin.lrs, val_top1.tolist(), strict=True)), float(top1[0]),
                           float(top5[0]))


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


def check_settings(lin: LinearConfig) -> None:
    """ConfigError naming the linear.* key that cannot work."""
    if lin.epochs < 1:
        raise ConfigError(f"linear.epochs must be >= 1, got {lin.epochs}")
    if lin.batch_size < 1:
        raise ConfigError(f"linear.batch_size must be >= 1, got {lin.batch_size}")
    if lin.mode == "fast" and not lin.lrs:
        raise ConfigError("linear.lrs is empty; the fast mode needs at least one learning rate to sweep")


def _check_labelled(data: DataConfig) -> None:
    if data.format == "folder":
        raise ConfigError("data.format: 'folder' images have no labels; the linear probe needs csv or imagefolder")


def _has_split(data: DataConfig, split: str) -> bool:
    """Whether the split's csv file (csv layout) or folder (imagefolder layout) exists."""
    return os.path.exists(os.path.join(data.root, f"{split}.csv" if data.format == "csv" else split))


def selection_splits(data: DataConfig) -> tuple[str, str] | None:
    """("train", data.val_split) when the dataset has both; None: hold out of data.train_split.
    A selection split that is the test split is an error: selection never looks at test."""
    if not (_has_split(data, SELECTION_TRAIN_SPLIT) and _has_split(data, data.val_split)):
        return None
    if data.val_split == data.test_split:
        raise ConfigError(f"data.val_split: '{data.val_split}' is also data.test_split; the lr must be selected "
                          f"without looking at the test split. Set data.val_split to a validation split.")
    return SELECTION_TRAIN_SPLIT, data.val_split


def holdout_names(cfg: EvalConfig) -> tuple[str, str]:
    """(fit, selection) split names of the fast probe without a train + val pair: both out of data.train_split."""
    train, fraction = cfg.data.train_split, cfg.linear.val_fraction
    return f"{train} (the rest)", f"{train} (stratified {fraction:g} held out, seed {cfg.seed})"


def probe_splits(cfg: EvalConfig, train_ds: Any) -> dict[str, Any]:
    """For the start-up summary: the split and number of images the probe fits its heads on and selects
    the lr on (fast mode; as `run_fast_probe` chooses them), or trains its one head on (full mode)."""
    d, lin = cfg.data, cfg.linear
    if lin.mode == "full":
        return {"linear.fit_split": d.train_split, "linear.fit_images": len(train_ds),
                "linear.val_split": "none (full mode: linear.lr, no selection)"}
    pair = selection_splits(d)
    if pair is not None:
        fit, val = (len(build_dataset(d, split)) for split in pair)
    else:
        keep, held = stratified_holdout(torch.as_tensor(train_ds.labels), lin.val_fraction, cfg.seed)
        pair, fit, val = holdout_names(cfg), len(keep), len(held)
    return {"linear.fit_split": pair[0], "linear.fit_images": fit, "linear.val_split": pair[1],
            "linear.val_images": val}


def run_fast_probe(cfg: EvalConfig, vit: VisionTransformer, accelerator: Accelerator,
                   out: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Fast mode on the cached features of the configured splits → (metrics, protocol) on the
    main process, ({}, {}) on the others. Every split is extracted before any training, so a missing
    or empty split fails first."""
    d, lin = cfg.data, cfg.linear
    _check_labelled(d)
    check_settings(lin)
    pair = selection_splits(d)
    *train, train_ds = split_features(cfg, vit, accelerator, d.train_split, out)
    *test, test_ds = split_features(cfg, vit, accelerator, d.test_split, out)
    datasets = [train_ds, test_ds]
    if pair is not None:
        (*fit, fit_ds), (*val, val_ds) = (split_features(cfg, vit, accelerator, s, out) for s in pair)
        datasets += [fit_ds, val_ds]
        selection = {"selection_split": pair[1], "selection_train_split": pair[0]}
    else:
        if not 0 < lin.val_fraction < 1:
            raise ConfigError(f"linear.val_fraction must be in (0, 1), got {lin.val_fraction}")
        keep, held = stratified_holdout(train[1], lin.val_fraction, cfg.seed)
        if len(held) == 0:
            raise ConfigError(f"linear.val_fraction: {lin.val_fraction} of {d.train_split} ({len(train[1])} images) "
                              f"holds out no image of any class; raise it, or give the dataset a "
                              f"{SELECTION_TRAIN_SPLIT} and a {d.val_split} split")
        fit, val = (train[0][keep], train[1][keep]), (train[0][held], train[1][held])
        log.info("no %s + %s splits: selecting the lr on %d images held out of %s", SELECTION_TRAIN_SPLIT,
                 d.val_split, len(held), d.train_split)
        fit_name, val_name = holdout_names(cfg)
        selection = {"selection_split": val_name, "selection_train_split": fit_name}
    if not accelerator.is_main_process:
        return {}, {}
    dev = accelerator.device
    fit, val, train, test = ((x.to(dev), y.to(dev)) for x, y in (fit, val, train, test))
    result = fast_probe(fit, val, train, test, lin, cfg.seed)
    scale = lin.batch_size / 256
    protocol = {
        "name": "linear", "mode": "fast", **selection, "train_split": d.train_split, "test_split": d.test_split,
        "lr": result.lr, "lr_scaled": result.lr * scale, "lrs": lin.lrs, "val_top1": result.val_top1,
        "selection": "best validation top-1 (ties: first listed lr), then retrained on train_split",
        "epochs": lin.epochs, "batch_size": lin.batch_size, "optimizer": "sgd", "momentum": lin.momentum,
        "weight_decay": lin.weight_decay, "schedule": "cosine to 0 per step", "head_init": f"normal(0, {INIT_STD})",
        "feature_norm": "none", "augmentation": "none (cached eval-transform features)",
        "train_size": len(train[1]), "fit_size": len(fit[1]), "val_size": len(val[1]), "test_size": len(test[1]),
        "skipped_images": skipped_images(*datasets),
    }
    return {"linear.top1": result.top1, "linear.top5": result.top5}, protocol


def run_full_probe(cfg: EvalConfig, vit: VisionTransformer, accelerator: Accelerator,
                   out: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Full mode: trains (or resumes, `linear.resume`) one head on augmented images of
    data.train_split in <out>/linear_full, then scores it on the cached test features →
    (metrics, protocol) on the main process, ({}, {}) on the others."""
    d, lin = cfg.data, cfg.linear
    _check_labelled(d)
    check_settings(lin)
    # The backbone is frozen, so the head applied to cached eval features is the eval pass; extracting them
    # first also fails fast on a bad test split.
    test_x, test_y, test_ds = split_features(cfg, vit, accelerator, d.test_split, out)
    dataset = build_dataset(d, d.train_split, crop_flip_transform(d.image_size, d.mean, d.std))
    world = accelerator.num_processes
    if len(dataset) < lin.batch_size * world:
        raise ConfigError(f"linear.batch_size: {d.train_split} has {len(dataset)} images, fewer than one batch "
                          f"({lin.batch_size} × {world} processes); lower linear.batch_size")
    run = open_run(cfg, out / FULL_RUN_DIR, lin.resume, accelerator, resume_key="linear.resume")
    sampler, loader = run.loader(dataset, lin.batch_size)
    per_epoch, total = sampler.batches_per_epoch, lin.epochs * sampler.batches_per_epoch
    train = LoopConfig(epochs=lin.epochs, batch_size=lin.batch_size, checkpoint_every=per_epoch,
                       log_every=min(10, per_epoch))
    lr = lin.lr * lin.batch_size * world / 256
    schedules = {"lr": cosine_schedule(lr, 0.0, total), "weight_decay": np.full(total, lin.weight_decay)}
    head = LinearHeads(test_x.shape[1], max(dataset.num_classes, test_ds.num_classes), 1, cfg.seed)
    optimizer = torch.optim.SGD(head.param_groups([lr], lin.weight_decay), lr=lr, momentum=lin.momentum)
    head, optimizer = run.start(head, optimizer, "resuming the linear probe")
    metrics = run.metrics()
    vit = vit.to(accelerator.device).eval().requires_grad_(False)

    def compute_loss(batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, labels = (t.to(accelerator.device, non_blocking=True) for t in batch)
        with torch.no_grad(), feature_precision(cfg.features.precision, accelerator.device):
            features = pool_features(vit, images, cfg.features.kind, cfg.features.last_n).float()
        logits = head(features)[0]
        return {"loss": F.cross_entropy(logits, labels), "top1": (logits.argmax(dim=1) == labels).float().mean()}

    state = LoopState(schedules=schedules, start_step=run.start_step, lr_key="linear.lr", resume_key=run.resume_key)
    step = run.train(head, optimizer, loader, sampler, train, state, metrics, compute_loss)
    if not accelerator.is_main_process:
        return {}, {}
    dev = accelerator.device
    top1, top5 = head_accuracy(accelerator.unwrap_model(head), test_x.to(dev), test_y.to(dev))
    protocol = {
        "name": "linear", "mode": "full", "selection_split": "none (linear.lr from config, no sweep)",
        "train_split": d.train_split, "test_split": d.test_split, "lr": lin.lr, "lr_scaled": lr,
        "epochs": lin.epochs, "batch_size": lin.batch_size * world, "optimizer": "sgd", "momentum": lin.momentum,
        "weight_decay": lin.weight_decay, "schedule": "cosine to 0 per step", "head_init": f"normal(0, {INIT_STD})",
        "feature_norm": "none", "augmentation": "RandomResizedCrop(scale 0.08-1) + horizontal flip",
        "steps": step, "resumed_from_step": run.start_step, "train_size": len(dataset), "test_size": len(test_y),
        "run_dir": str(run.run_dir), "skipped_images": skipped_images(dataset, test_ds),
    }
    return {"linear.top1": float(top1[0]), "linear.top5": float(top5[0])}, protocol
