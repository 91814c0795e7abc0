"""Embeddings out: the frozen features of one split written as .npy shards that numpy and faiss read directly.

An output folder holds
- `shard-00000.npy`, ...: (rows, dim) arrays of `embed.dtype`, `embed.shard_size` rows each (the last fewer), in
  dataset order: concatenated they are row i = image i;
- `images.csv`: `index,path` (the shards layout: `index,shard,member`, the tar file and the image's member in it) and
  `label` when the dataset has labels, one row per image in the same order;
- `manifest.json`: what was embedded (model, checkpoint, weights digest, data, split, transform, feature, dtype, dim,
  count) under `key` (sslfg.evaluation.features.cache_key: weights, images, labels, transform, feature, precision),
  and the shards, each with its rows, its own key (that of its images) and whether it is complete.

Every file is written atomically (sslfg.files), a shard's manifest entry only after the shard, so a stopped run
leaves complete shards that a rerun of the same embedding keeps (it recomputes only the others). A folder is
written only if it is empty (hidden files aside), holds an embedding with the same key, dtype and shard size, or
holds an unfinished one whose settings (`SETTINGS`) are the same, or of which no shard is complete: a run stopped
by a bad image and rerun with data.on_bad_image=skip (or with the image fixed) keeps each complete shard whose images
(its own key) are unchanged and recomputes the others. A finished embedding is never written over.
Features come from sslfg.evaluation.features.extract_features: every process of an `accelerate launch` embeds its
part of each shard, and the main process writes the gathered shard.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Subset

from sslfg.cli import CommandLine, print_summary
from sslfg.config import ConfigError, load_config
from sslfg.data.datasets import build_dataset
from sslfg.data.shard_reader import ShardDataset
from sslfg.data.transforms import eval_transform
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.rundir import check_output_dir, claim_run_dir, data_roots, ensure_writable
from sslfg.evaluation.features import cache_key, extract_features, weights_digest
from sslfg.evaluation.run import build_backbone, output_dir, run_data_defaults
from sslfg.files import atomic_path, write_json, write_text
from sslfg.schema import EvalConfig
from sslfg.summary import startup_summary

MANIFEST = "manifest.json"
IMAGES = "images.csv"
log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def plan(cfg: EvalConfig, vit: VisionTransformer, dataset: Any, split: str, info: dict[str, Any]) -> dict[str, Any]:
    """The manifest of embedding `dataset` (its `transform` the evaluation transform), every shard incomplete."""
    f, e, n = cfg.features, cfg.embed, len(dataset)
    transform, digest = getattr(dataset, "transform", None), weights_digest(vit)
    spec = (split, transform, f.kind, f.last_n, f.precision)

    def rows_key(a: int, b: int) -> str:  # what shard a..b depends on: its images and `spec`
        return cache_key(digest, SimpleNamespace(paths=[dataset.paths[i] for i in range(a, b)],
                                                 labels=dataset.labels[a:b]), *spec)

    shards = [[a, min(a + e.shard_size, n)] for a in range(0, n, e.shard_size)]
    return {"key": cache_key(digest, dataset, *spec), "model": info["backbone"], "checkpoint": cfg.checkpoint,
            "init": info["init"], "weights": digest[:20], "data.root": cfg.data.root, "data.format": cfg.data.format,
            "split": split, "transform": repr(transform), "feature": f.kind,
            "last_n": f.last_n if f.kind == "lastn" else None, "precision": f.precision, "dtype": e.dtype,
            "shard_size": e.shard_size, "dim": None, "count": n, "labels": dataset.num_classes > 0, "complete": False,
            "shards": [{"file": shard_name(i), "rows": rows, "key": rows_key(*rows), "complete": False}
                       for i, rows in enumerate(shards)]}


SAME = ("key", "dtype", "shard_size")  # what makes a folder's embedding the one asked for
# what besides the images makes it another embedding (the weights by their digest: `init` names them)
SETTINGS = ("weights", "split", "transform", "feature", "last_n", "precision", "dtype", "shard_size")


def previous(out: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest to continue in `out`: None if `out` is empty; its own for the same embedding; `manifest` with
    the complete shards of the same images marked so for an unfinished embedding of other images, or one with no
    complete shard. ConfigError naming what differs for a finished embedding or an unfinished one with other
    `SETTINGS` (never written over: its shards would be lost), and for files that are not an embedding."""
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if not entries:
        return None
    path = out / MANIFEST
    old = json.loads(path.read_text()) if path.is_file() else None
    if old is None:
        listed = f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}"
        raise ConfigError(f"output_dir: {out} holds files that are not an embedding ({listed}); eval.embed writes only "
                          "into an empty folder or its own earlier embedding: choose another output_dir")
    if all(old.get(k) == manifest[k] for k in SAME):
        return old
    changed = [f"{k}: {_setting(old, k)} there, {_setting(manifest, k)} now" for k in SETTINGS
               if old.get(k) != manifest[k]]
    images = f"images: {old.get('count')} there, {manifest['count']} now (or other files, labels or file times)"
    kept = {(s["file"], s.get("key")) for s in old["shards"] if s["complete"]}
    differs = "; ".join(changed) or images
    if old.get("complete") or (changed and kept):
        then = ("eval.embed never writes over a finished embedding: choose another output_dir" if old.get("complete")
                else "its complete shards would be lost: finish it with its own settings or choose another output_dir")
        raise ConfigError(f"output_dir: {out} holds {'a finished' if old.get('complete') else 'an unfinished'} "
                          f"embedding of other settings or images ({differs}); {then}")
    for shard in manifest["shards"]:
        shard["complete"] = (shard["file"], shard["key"]) in kept
    log.warning("output_dir: %s holds an unfinished embedding of other settings or images (%s): this run replaces it, "
                "keeping the %d of its complete shards whose images are unchanged", out, differs,
                sum(s["complete"] for s in manifest["shards"]))
    return manifest


def _setting(manifest: dict[str, Any], key: str) -> Any:
    """A manifest's value of `key` as a message shows it: the weights by their source, then their digest."""
    weights = f"{manifest.get('init')}, digest {manifest.get('weights') or 'not recorded'}"
    return weights if key == "weights" else manifest.get(key)


def image_table(dataset: Any) -> str:
    """images.csv: index, path (the shards layout: shard and member, the tar file and the image's name in it, as
    `tar` and webdataset name them; a tar member has no path of its own) and, when the dataset has labels, label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    labelled, shards = dataset.num_classes > 0, isinstance(dataset, ShardDataset)
    writer.writerow(["index", *(("shard", "member") if shards else ("path",)), *(("label",) if labelled else ())])
    for i in range(len(dataset)):
        where = dataset.member(i) if shards else (dataset.paths[i],)
        writer.writerow([i, *where, *((dataset.labels[i],) if labelled else ())])
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
        for stale in set(out.glob("shard-*.npy")) - {out / s["file"] for s in manifest["shards"]}:
            stale.unlink()  # past the last shard of the unfinished embedding this one replaces (`previous`)
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


def run_embedding(args: CommandLine) -> dict:
    """eval.embed from its command line: config (the run's own data settings as `run_data_defaults`), backbone,
    the split's dataset, start-up summary (and stop there with --check), then the shards; returns the manifest."""
    cfg, sources, data_note = run_data_defaults(load_config(args.files, args.overrides, EvalConfig))
    if cfg.output:
        raise ConfigError("output: eval.embed writes no metrics file; name its folder with output_dir=PATH")
    accelerator = make_accelerator()
    vit, info = build_backbone(cfg)
    split = cfg.embed.split or cfg.data.train_split
    d = cfg.data
    dataset = build_dataset(d, split, eval_transform(d.image_size, d.mean, d.std, cfg.features.crop_ratio),
                            "--split (embed.split)" if cfg.embed.split else "")
    out = output_dir(cfg, info) if cfg.output_dir else output_dir(cfg, info) / f"embed-{split}"
    check_output_dir(cfg.output_dir or out, reads=data_roots(cfg))  # --check too
    manifest = plan(cfg, vit, dataset, split, info)
    manifest = previous(out, manifest) or manifest
    complete = sum(s["complete"] for s in manifest["shards"])
    facts = {"data.settings": data_note, "command": "embed", "num_processes": accelerator.num_processes,
             "init": info["init"], "backbone": info["backbone"], "embed.output_dir": str(out),
             "embed.shards": f"{len(manifest['shards'])} of up to {cfg.embed.shard_size} rows, {complete} complete",
             "embed.dtype": cfg.embed.dtype, "features.kind": cfg.features.kind}
    summary = startup_summary(d, {split: dataset}, sources, facts)
    if accelerator.is_main_process:
        print_summary(summary)
    if args.check:
        return summary
    ensure_writable(out)
    if accelerator.is_main_process:
        claim_run_dir(out, "embed")
    manifest = write_embeddings(cfg, vit, dataset, manifest, accelerator, out)
    if accelerator.is_main_process:
        print(f"embeddings: {out} ({manifest['count']} x {manifest['dim']} {manifest['dtype']})")
    return manifest | {"output_dir": str(out)}
