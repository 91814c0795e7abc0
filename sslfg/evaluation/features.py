"""Frozen-feature extraction shared by every evaluation: batched, sharded over processes, cached.

Features are cached on disk under a key that hashes the backbone's actual weights, the dataset's
file list and labels, each image file's size and modification time (st_mtime_ns: a file replaced or
rewritten in place gets a new one; its bytes are not read), the split, the eval transform (its repr:
size, crop, mean and std), the feature type and the precision, so a changed checkpoint, image, dataset
or precision never reuses stale features. A cache file that cannot be read (truncated, corrupt) or does
not match the dataset is recomputed and replaced, with a warning.

Precision (`features.precision`): "fp32" runs the backbone in float32 (under the accelerator's own
autocast, if any: the online kNN's training one), with TF32 matmuls on CUDA; "bf16" under bf16
autocast (on CPU too), features returned as float32 either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sslfg.engine.accelerator import tf32
from sslfg.files import atomic_path
from sslfg.models.backbone import forward_tokens, pooled_feature

FeatureKind = Literal["cls", "mean", "lastn", "pixels"]
Precision = Literal["fp32", "bf16"]
log = logging.getLogger(__name__)


def pool_features(vit: VisionTransformer, x: Tensor, kind: FeatureKind = "cls", last_n: int = 4) -> Tensor:
    """(B, 3, H, W) → (B, D) for "cls" (final CLS after the final norm; a non-ViT's pooled feature) and "mean"
    (mean of the final patch tokens), (B, last_n·D) for "lastn" (CLS of the last n blocks, each normalised), and
    (B, 3·H·W) for "pixels" (the normalised image itself: the raw-pixel floor; `vit` is unused)."""
    if kind == "pixels":
        return x.flatten(1)
    if kind == "lastn":
        layers = vit.get_intermediate_layers(x, n=last_n, return_prefix_tokens=True, norm=True)
        return torch.cat([prefix[:, 0] for _, prefix in layers], dim=1)
    if kind == "cls":
        return pooled_feature(vit, x)
    return forward_tokens(vit, x)[:, vit.num_prefix_tokens :].mean(dim=1)


@contextlib.contextmanager
def feature_precision(precision: Precision, device: torch.device) -> Iterator[None]:
    """The frozen backbone's numerics: TF32 on CUDA, and bf16 autocast for "bf16" ("fp32" adds no
    autocast context, so an enclosing one still applies)."""
    bf16 = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with tf32(device), bf16:
        yield


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor of the state dict, in order: identifies the weights, not the file."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        # reshape: a 0-dim tensor (batch norm's num_batches_tracked) cannot be viewed as bytes; same bytes otherwise
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(weights: str, dataset: object, split: str, transform: object, kind: str, last_n: int,
              precision: str = "fp32") -> str:
    """Hash of everything the features depend on. `dataset` needs `paths` and `labels`."""
    h = hashlib.sha256()
    spec = {"weights": weights, "split": split, "transform": repr(transform), "kind": kind,
            "last_n": last_n if kind == "lastn" else 0, "precision": precision}
    h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(json.dumps([list(map(str, dataset.paths)), list(map(int, dataset.labels))]).encode())
    h.update(json.dumps([_file_stamp(p) for p in dataset.paths]).encode())
    return h.hexdigest()[:20]


def _file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file, cheap to read for every image, or of its shard for a member of one
    (`<shard>.tar/<member>`, the shards layout); (-1, -1) for one that is gone (the extraction then names it)."""
    try:
        try:
            st = os.stat(path)
        except NotADirectoryError:  # the path goes through a file: a shard member
            st = os.stat(os.path.dirname(path))
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


@torch.no_grad()
def extract_features(vit: VisionTransformer, dataset: torch.utils.data.Dataset, accelerator: Accelerator,
                     batch_size: int = 256, num_workers: int = 4, kind: FeatureKind = "cls", last_n: int = 4,
                     desc: str = "features", precision: Precision = "fp32") -> tuple[Tensor, Tensor]:
    """Features (N, D') float32 and labels (N,) int64 on the CPU, in dataset order, on every process.

    Each process embeds its shard; `gather_for_metrics` reassembles them and drops the samples
    accelerate repeats to even out the last batch, so no sample is counted twice.
    """
    loader = accelerator.prepare_data_loader(
        DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                   pin_memory=accelerator.device.type == "cuda")
    )
    vit = vit.to(accelerator.device).eval()
    features, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True):
        with accelerator.autocast(), feature_precision(precision, accelerator.device):
            f = pool_features(vit, images, kind, last_n).float()
        f, targets = accelerator.gather_for_metrics((f.contiguous(), targets.to(accelerator.device)))
        features.append(f.cpu())
        labels.append(targets.cpu().long())
    return torch.cat(features), torch.cat(labels)


def cached_features(vit: VisionTransformer, dataset: torch.utils.data.Dataset, split: str, cache_dir: Path | None,
                    accelerator: Accelerator, batch_size: int = 256, num_workers: int = 4,
                    kind: FeatureKind = "cls", last_n: int = 4, precision: Precision = "fp32") -> tuple[Tensor, Tensor]:
    """`extract_features`, read from / written to `cache_dir` (None: no cache)."""
    extract = (vit, dataset, accelerator, batch_size, num_workers, kind, last_n, split, precision)
    if cache_dir is None:
        return extract_features(*extract)
    key = cache_key(weights_digest(vit), dataset, split, getattr(dataset, "transform", None), kind, last_n, precision)
    path = Path(cache_dir) / f"{split}-{key}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            features, labels = stored["features"], stored["labels"]
        except (SafetensorError, OSError, KeyError) as err:
            log.warning("feature cache %s cannot be read (%s); recomputing it", path, err)
        else:
            if len(features) == len(labels) == len(dataset):
                return features, labels
            log.warning("feature cache %s holds %d features for %d images; recomputing it", path, len(features),
                        len(dataset))
    features, labels = extract_features(*extract)
    if accelerator.is_main_process:
        with atomic_path(path) as tmp:
            save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp))
    accelerator.wait_for_everyone()
    return features, labels
