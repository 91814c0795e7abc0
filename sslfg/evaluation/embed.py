"""Embeddings out: the frozen features of one split written as .npy shards that numpy and faiss read directly.

An output folder holds
- `shard-00000.npy`, ...: (rows, dim) arrays of `embed.dtype`, `embed.shard_size` rows each (the last fewer), in
  dataset order: concatenated they are row i = image i;
- `images.csv`: `index,path` (and `label` when the dataset has labels), one row per image in the same order;
- `manifest.json`: what was embedded (model, checkpoint, data, split, transform, feature, dtype, dim, count) under
  `key` (sslfg.evaluation.features.cache_key: weights, images, labels, transform, feature, precision), and the
  shards, each with its rows and whether it is complete.

Every file is written atomically (sslfg.files), a shard's manifest entry only after the shard, so a stopped run
leaves complete shards that a rerun of the same embedding keeps (it recomputes only the others). A folder is
written only if it is empty (hidden files aside) or holds an embedding with the same key, dtype and shard size.
Features come from sslfg.evaluation.features.extract_features: every process of an `accelerate launch` embeds its
part of each shard, and the main process writes the gathered shard.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Subset

from sslfg.config import ConfigError
from sslfg.evaluation.features import cache_key, extract_features, weights_digest
from sslfg.files import atomic_path, write_json, write_text
from sslfg.schema import EvalConfig

MANIFEST = "manifest.json"
IMAGES = "images.csv"
log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def plan(cfg: EvalConfig, vit: VisionTransformer, dataset: Any, split: str, info: dict[str, Any]) -> dict[str, Any]:
    """The manifest of embedding `dataset` (its `transform` the evaluation transform), every shard incomplete."""
    f, e, n = cfg.features, cfg.embed, len(dataset)
    transform = getattr(dataset, "transform", None)
    key = cache_key(weights_digest(vit), dataset, split, transform, f.kind, f.last_n, f.precision)
    starts = range(0, n, e.shard_size)
    return {"key": key, "model": info["backbone"], "checkpoint": cfg.checkpoint, "init": info["init"],
            "data.root": cfg.data.root, "data.format": cfg.data.format, "split": split, "transform": repr(transform),
            "feature": f.kind, "precision": f.precision, "dtype": e.dtype, "shard_size": e.shard_size, "dim": None,
            "count": n, "labels": dataset.num_classes > 0, "complete": False,
            "shards": [{"file": shard_name(i), "rows": [a, min(a + e.shard_size, n)], "complete": False}
                       for i, a in enumerate(starts)]}


SAME = ("key", "dtype", "shard_size")  # what makes a folder's embedding the one asked for


def previous(out: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the same embedding in `out`, None if `out` is empty; ConfigError if `out` holds anything
    else (files of another embedding or not of an embedding at all), which this command never writes over."""
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if not entries:
        return None
    path = out / MANIFEST
    old = json.loads(path.read_text()) if path.is_file() else None
    differ = [k for k in SAME if old is not None and old.get(k) != manifest[k]]
    if old is None or differ:
        changes = "; ".join(f"{k} {old.get(k)} there, {manifest[k]} now" for k in differ)
        what = (f"an embedding of other data, weights or settings ({changes})" if old is not None
                else f"files that are not an embedding ({', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})")
        raise ConfigError(f"output_dir: {out} holds {what}; eval.embed writes only into an empty folder or its own "
                          "earlier embedding of the same thing: choose another output_dir")
    return old


def image_table(dataset: Any) -> str:
    """images.csv: index, path and, when the dataset has labels, label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    labelled = dataset.num_classes > 0
    writer.writerow(["index", "path", "label"] if labelled else ["index", "path"])
    for i, path in enumerate(dataset.paths):
        writer.writerow([i, path, dataset.labels[i]] if labelled else [i, path])
    return buffer.getvalue()


def write_embeddings(cfg: EvalConfig, vit: VisionTransformer, dataset: Any, manifest: dict[str, Any],
                     accelerator: Accelerator, out: Path) -> dict[str, Any]:
    """Embeds the shards of `manifest` that are not complete (every process) and writes them, the image table and
    the manifest to `out` (main process); returns the final manifest."""
    done = {s["file"] for s in manifest["shards"] if s["complete"] and (out / s["file"]).is_file()}
    for shard in manifest["shards"]:
        shard["complete"] = shard["file"] in done
    manifest["complete"] = len(done) == len(manifest["shards"])
    if done:
        log.info("%s: %d of %d shards already complete, embedding the other %d", out, len(done),
                 len(manifest["shards"]), len(manifest["shards"]) - len(done))
    accelerator.wait_for_everyone()  # every process has read the folder (`previous`) before it changes
    if accelerator.is_main_process:  # the manifest first: a folder with any file of ours names what it holds
        write_json(out / MANIFEST, manifest)
        write_text(out / IMAGES, image_table(dataset))
    for shard in manifest["shards"]:
        if shard["file"] in done:
            continue
        rows = range(*shard["rows"])
        features, _ = extract_features(vit, Subset(dataset, rows), accelerator, cfg.features.batch_size,
                                       cfg.data.num_workers, cfg.features.kind, cfg.features.last_n,
                                       desc=f"embed {shard['file']}", precision=cfg.features.precision)
        if accelerator.is_main_process:
            with atomic_path(out / shard["file"]) as tmp, open(tmp, "wb") as f:
                np.save(f, features.numpy().astype(cfg.embed.dtype))
            shard["complete"], manifest["dim"] = True, features.shape[1]
            write_json(out / MANIFEST, manifest)
    manifest["complete"] = True
    if accelerator.is_main_process:
        write_json(out / MANIFEST, manifest)
    accelerator.wait_for_everyone()
    return manifest
