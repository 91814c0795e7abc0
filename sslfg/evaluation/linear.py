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

import copy
import logging
import math
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
from sslfg.data.loader import sample_seed
from sslfg.data.transforms import crop_flip_transform
from sslfg.distributed import is_main_process, world_size
from sslfg.engine.run import check_run, open_run
from sslfg.engine.schedules import cosine_schedule
from sslfg.evaluation.features import feature_precision, pool_features
from sslfg.evaluation.run import EvalDatasets, eval_output_dir, skipped_images, split_features
from sslfg.evaluation.selection import holdout_names, selection_features, selection_splits, stratified_holdout
from sslfg.schema import EvalConfig, LinearConfig, LoopConfig
from sslfg.verdicts import correct_path, write_correct

log = logging.getLogger(__name__)

INIT_STD = 0.01
FULL_RUN_DIR = "linear_full"  # full mode's run directory inside the eval output folder
EVAL_CHUNK = 4096  # features per scoring block: bounds the (L, chunk, C) logits

Split = tuple[Tensor, Tensor]  # features (N, D) float, labels (N,) int64


class LinearHeads(nn.Module):
    """L independent classifiers Linear(D, C) on the same input: x (B, D) → logits (L, B, C).

    Every head starts from the same N(0, 0.01) weights drawn from `seed` and a zero bias, so the
    heads of a sweep differ only by their lr. Each head's weight (D, C) and bias (C,) are separate
    parameters, so each can be its own optimizer param group (its own lr); `forward` joins them
    side by side into one matmul (D, L·C): with few classes a batched matmul of L thin (D, C) products
    is about 5x slower on a CPU (7,056 raw pixels, 8 heads).
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 1, seed: int = 0) -> None:
        super().__init__()
        weight = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(seed)) * INIT_STD
        self.weights = nn.ParameterList(nn.Parameter(weight.clone()) for _ in range(num_heads))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads))

    def forward(self, x: Tensor) -> Tensor:
        w = torch.cat(list(self.weights), dim=1)  # (D, L·C)
        b = torch.cat(list(self.biases))  # (L·C,)
        return torch.addmm(b, x, w).view(len(x), len(self.weights), -1).transpose(0, 1)

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
def head_hits(heads: LinearHeads, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per head and sample, top-1 and top-5 hits, (L, N) bool each.

    features (N, D); labels (N,) head indices, -1 for a class the heads never saw (always wrong). A
    row whose logits are not finite (a diverged head) counts as wrong. Top-5 is top-C when C < 5.
    """
    top1, top5 = [], []
    for x, y in zip(features.split(EVAL_CHUNK), labels.split(EVAL_CHUNK), strict=True):
        logits = heads(x)  # (L, b, C)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]  # (L, b, k)
        finite = torch.isfinite(logits).all(dim=-1)
        top1.append(top[..., 0] & finite)
        top5.append(top.any(dim=-1) & finite)
    return torch.cat(top1, dim=1), torch.cat(top5, dim=1)


def contiguous_labels(labels: Tensor, classes: Tensor) -> Tensor:
    """Class ids (N,) → their index in `classes` (sorted unique ids, (C,)); -1 for an id not in it."""
    idx = torch.searchsorted(classes, labels).clamp(max=len(classes) - 1)
    return torch.where(classes[idx] == labels, idx, -1)


def fit_and_score(train: Split, test: Split, lrs: Sequence[float], lin: LinearConfig,
                  seed: int) -> tuple[Tensor, Tensor]:
    """Trains one head per (scaled) lr on `train` and scores each on `test`: top-1, top-5 hits, (L, N) each."""
    classes = torch.unique(train[1])
    heads = train_heads(train[0], contiguous_labels(train[1], classes), len(classes), lrs, lin.epochs,
                        lin.batch_size, lin.momentum, lin.weight_decay, seed)
    return head_hits(heads, test[0], contiguous_labels(test[1], classes))


@dataclass
class FastProbeResult:
    """What `fast_probe` chose and measured."""

    lr: float  # the chosen lr, as listed in linear.lrs (before the batch / 256 scaling)
    val_top1: dict[float, float]  # validation top-1 of every swept lr, linear.lrs first, then the extension's
    top1: float  # test accuracy of the chosen lr retrained on the train split
    top5: float
    hits: Tensor  # (N,) bool: the test images the chosen lr got right (top-1)
    extended: int = 0  # lrs swept beyond linear.lrs (linear.extend_grid)
    at_bound: bool = False  # the extension stopped at linear.extend_grid with the chosen lr still at the edge

    @property
    def edge_warning(self) -> str:
        """A sentence when the chosen lr is the smallest or largest of several swept (the best may lie beyond)."""
        lrs = sorted(self.val_top1) if self.extended else list(self.val_top1)
        side = edge_side(self.lr, lrs)
        if not side:
            return ""
        bound = f" (linear.extend_grid={self.extended} lrs swept past linear.lrs)" if self.at_bound else ""
        beyond = "below" if side == "smallest" else "above"
        return (f"linear.lrs: the chosen lr {self.lr:g} is the {side} of the grid {lrs}{bound}; a better one may lie "
                f"{beyond} it: extend linear.lrs")


def edge_side(lr: float, lrs: Sequence[float]) -> str:
    """"smallest" or "largest" when `lr` is that end of several `lrs`, else ""."""
    if len(lrs) < 2 or lr not in (min(lrs), max(lrs)):
        return ""
    return "smallest" if lr == min(lrs) else "largest"


def lrs_beyond(lrs: Sequence[float], side: str, count: int) -> list[float]:
    """`count` lrs past the `side` end of `lrs` (at least two), outward, spaced as the grid's end: each new lr is
    one step past the last, the step being the one two places in (the default grid's 1, 3.3 rhythm continues:
    0.001, 0.003, 0.01 → 3e-4, 1e-4, 3e-5), rounded to 6 significant digits."""
    grid = sorted(lrs) if side == "smallest" else sorted(lrs, reverse=True)  # grid[0] is the end
    new: list[float] = []
    for _ in range(count):
        ratio = grid[1] / grid[2] if len(grid) > 2 else grid[0] / grid[1]
        grid.insert(0, float(f"{grid[0] * ratio:.6g}"))
        new.append(grid[0])
    return new


EXTEND_STEP = 3  # lrs swept per round of the grid's extension


def fast_probe(fit: Split, val: Split, train: Split, test: Split, lin: LinearConfig, seed: int = 0) -> FastProbeResult:
    """The fast linear probe on feature tensors (all on one device).

    Sweeps `lin.lrs` (each · batch / 256) on `fit` and picks the best top-1 on `val` (ties: the lr
    listed first). While that lr is an end of the lrs swept, sweeps up to EXTEND_STEP more past it
    (`lrs_beyond`), at most `lin.extend_grid` in all, on the same split (the heads are independent, so a
    later round equals training them with the grid). Then retrains the chosen lr on `train` and scores it
    on `test`. `test` is used only after the choice; `fit`/`val` and `train` may overlap (train = fit ∪ val
    usually).
    """
    check_settings(lin)
    scale = lin.batch_size / 256
    lrs, new = [], list(lin.lrs)
    val_top1: list[float] = []
    while new:
        lrs += new
        val_top1 += fit_and_score(fit, val, [lr * scale for lr in new], lin, seed)[0].double().mean(dim=1).tolist()
        best = lrs[val_top1.index(max(val_top1))]  # first of equal maxima
        side, room = edge_side(best, lrs), lin.extend_grid - (len(lrs) - len(lin.lrs))
        new = lrs_beyond(lrs, side, min(EXTEND_STEP, room)) if side and room > 0 else []
    top1, top5 = fit_and_score(train, test, [best * scale], lin, seed)
    extended = len(lrs) - len(lin.lrs)
    return FastProbeResult(best, dict(zip(lrs, val_top1, strict=True)), top1[0].double().mean().item(),
                           top5[0].double().mean().item(), top1[0].cpu(), extended,
                           bool(extended and edge_side(best, lrs)))


def check_settings(lin: LinearConfig) -> None:
    """ConfigError naming the linear.* key that cannot work."""
    if lin.epochs < 1:
        raise ConfigError(f"linear.epochs must be >= 1, got {lin.epochs}")
    if lin.batch_size < 1:
        raise ConfigError(f"linear.batch_size must be >= 1, got {lin.batch_size}")
    if lin.mode == "fast" and not lin.lrs:
        raise ConfigError("linear.lrs is empty; the fast mode needs at least one learning rate to sweep")


def check_probe(cfg: EvalConfig, datasets: dict[str, Any]) -> None:
    """What the probe would refuse after the features are extracted, at start-up and with --check: its settings
    and, in full mode, a batch larger than the training split and what its run folder and linear.resume would
    (`check_run`)."""
    lin, train = cfg.linear, datasets[cfg.data.train_split]
    check_settings(lin)
    if lin.mode != "full":
        return
    if len(train) < lin.batch_size * world_size():
        raise ConfigError(f"linear.batch_size: {cfg.data.train_split} has {len(train)} images, fewer than one batch "
                          f"({lin.batch_size} × {world_size()} processes); lower linear.batch_size")
    check_run(cfg, eval_output_dir(cfg) / FULL_RUN_DIR, lin.resume, "linear.resume", "linear.full", is_main_process())


def probe_splits(cfg: EvalConfig, datasets: EvalDatasets) -> dict[str, Any]:
    """For the start-up summary: the split and number of images the probe fits its heads on and selects
    the lr on (fast mode; as `selection_features` chooses them), or trains its one head on (full mode)."""
    d, lin = cfg.data, cfg.linear
    train_ds = datasets[d.train_split]
    if lin.mode == "full":
        return {"linear.fit_split": d.train_split, "linear.fit_images": len(train_ds),
                "linear.val_split": "none (full mode: linear.lr, no selection)"}
    pair = selection_splits(d)
    if pair is not None:
        fit, val = (len(datasets[split]) for split in pair)
    else:
        keep, held = stratified_holdout(torch.as_tensor(train_ds.labels), lin.val_fraction, cfg.seed)
        pair, fit, val = holdout_names(d.train_split, lin.val_fraction, cfg.seed), len(keep), len(held)
    return {"linear.fit_split": pair[0], "linear.fit_images": fit, "linear.val_split": pair[1],
            "linear.val_images": val}


def run_probe(cfg: EvalConfig, vit: VisionTransformer, accelerator: Accelerator, out: Path,
              datasets: EvalDatasets) -> tuple[dict[str, float], dict[str, Any]]:
    """eval.linear's measurement: the probe of linear.mode."""
    probe = run_fast_probe if cfg.linear.mode == "fast" else run_full_probe
    return probe(cfg, vit, accelerator, out, datasets)


def run_fast_probe(cfg: EvalConfig, vit: VisionTransformer, accelerator: Accelerator, out: Path,
                   datasets: EvalDatasets) -> tuple[dict[str, float], dict[str, Any]]:
    """Fast mode on the cached features of the configured splits → (metrics, protocol) on the
    main process, ({}, {}) on the others. Every split is extracted before any training, so a missing
    or empty split fails first."""
    d, lin = cfg.data, cfg.linear  # its settings: checked at start-up (`check_probe`)
    *train, train_ds = split_features(cfg, vit, accelerator, datasets, d.train_split, out)
    *test, test_ds = split_features(cfg, vit, accelerator, datasets, d.test_split, out)
    fit, val, selection_ds, selection = selection_features(cfg, vit, accelerator, out, datasets, train,
                                                           lin.val_fraction, "lr")
    read = [train_ds, test_ds, *selection_ds]
    if not accelerator.is_main_process:
        return {}, {}
    dev = accelerator.device
    fit, val, train, test = ((x.to(dev), y.to(dev)) for x, y in (fit, val, train, test))
    result = fast_probe(fit, val, train, test, lin, cfg.seed)
    if result.edge_warning:
        log.warning("%s", result.edge_warning)
    write_correct(correct_path(out, "linear"), d.test_split, {"linear.top1": result.hits})
    scale = lin.batch_size / 256
    protocol = {
        "name": "linear", "mode": "fast", **selection, "train_split": d.train_split, "test_split": d.test_split,
        "lr": result.lr, "lr_scaled": result.lr * scale, "lrs": lin.lrs, "val_top1": result.val_top1,
        "lrs_swept": sorted(result.val_top1), "extend_grid": lin.extend_grid, "lrs_extended": result.extended,
        "extend_grid_at_bound": result.at_bound, "lr_warning": result.edge_warning,
        "selection": "best validation top-1 (ties: first listed lr), then retrained on train_split",
        "epochs": lin.epochs, "batch_size": lin.batch_size, "optimizer": "sgd", "momentum": lin.momentum,
        "weight_decay": lin.weight_decay, "schedule": "cosine to 0 per step", "head_init": f"normal(0, {INIT_STD})",
        "feature_norm": "none", "augmentation": "none (cached eval-transform features)",
        "train_size": len(train[1]), "fit_size": len(fit[1]), "val_size": len(val[1]), "test_size": len(test[1]),
        "skipped_images": skipped_images(*read),
    }
    return {"linear.top1": result.top1, "linear.top5": result.top5}, protocol


def run_full_probe(cfg: EvalConfig, vit: VisionTransformer, accelerator: Accelerator, out: Path,
                   datasets: EvalDatasets) -> tuple[dict[str, float], dict[str, Any]]:
    """Full mode: trains (or resumes, `linear.resume`) one head on augmented images of
    data.train_split in <out>/linear_full, then scores it on the cached test features →
    (metrics, protocol) on the main process, ({}, {}) on the others."""
    d, lin = cfg.data, cfg.linear  # its settings, batch and run folder: checked at start-up (`check_probe`)
    # The backbone is frozen, so the head applied to cached eval features is the eval pass
    test_x, test_y, test_ds = split_features(cfg, vit, accelerator, datasets, d.test_split, out)
    dataset = copy.copy(datasets[d.train_split])  # the split already read, with the augmentation instead
    dataset.transform = crop_flip_transform(d.image_size, d.mean, d.std)
    world = accelerator.num_processes
    run = open_run(cfg, out / FULL_RUN_DIR, lin.resume, accelerator, resume_key="linear.resume", kind="linear.full")
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

    state = run.loop_state(schedules, lr_key="linear.lr")
    step = run.train(head, optimizer, loader, sampler, train, state, metrics, compute_loss)
    run.close()
    if not accelerator.is_main_process:
        return {}, {}
    dev = accelerator.device
    top1, top5 = head_hits(accelerator.unwrap_model(head), test_x.to(dev), test_y.to(dev))
    write_correct(correct_path(out, "linear"), d.test_split, {"linear.top1": top1[0].cpu()})
    protocol = {
        "name": "linear", "mode": "full", "selection_split": "none (linear.lr from config, no sweep)",
        "train_split": d.train_split, "test_split": d.test_split, "lr": lin.lr, "lr_scaled": lr,
        "epochs": lin.epochs, "batch_size": lin.batch_size * world, "optimizer": "sgd", "momentum": lin.momentum,
        "weight_decay": lin.weight_decay, "schedule": "cosine to 0 per step", "head_init": f"normal(0, {INIT_STD})",
        "feature_norm": "none", "augmentation": "RandomResizedCrop(scale 0.08-1) + horizontal flip",
        "steps": step, "resumed_from_step": run.start_step, "train_size": len(dataset), "test_size": len(test_y),
        "run_dir": str(run.run_dir), "skipped_images": skipped_images(dataset, test_ds),
    }
    return {"linear.top1": top1[0].double().mean().item(), "linear.top5": top5[0].double().mean().item()}, protocol
