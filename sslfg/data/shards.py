"""Writes a dataset as WebDataset tar shards with an index: the shards layout (`sslfg.data.shard_reader`).

    python -m sslfg.data.shards --config configs/datasets/sample.yaml --out data/sample_shards

Any dataset a recipe's data section describes (csv with or without labels and boxes, imagefolder, folder;
key=value overrides apply) is read as every command reads it, and each of data.train_split, data.val_split,
data.test_split and `train` (which the evaluations' selections pair with data.val_split) that exists becomes
`<split>-000000.tar`, ... of about --shard-mb each, with `<split>.json` (shard list, class names; also a wids
dataset description) and `<split>.npz`
(offsets, labels, sizes, boxes); the folder layout has one split, written as data.train_split. Each image is
stored byte for byte and decoded as it is written, under the readers' rules (data.on_bad_image,
data.max_image_pixels). Everything is written into a temporary folder beside --out and renamed to --out at the
end: --out holds a whole set or nothing, and an --out that is not empty, or inside the dataset folder, is refused.
Read the shards with data.format=shards data.root=<out>, the other data keys as for the original.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sslfg.cli import command_parser, run_cli
from sslfg.config import ConfigError
from sslfg.data.build.stats import load_data_config
from sslfg.data.datasets import build_dataset, split_exists
from sslfg.data.images import DataError, decode_image
from sslfg.data.shard_reader import FORMAT_VERSION, sample_key, shard_name
from sslfg.engine.rundir import check_output_dir
from sslfg.evaluation.selection import SELECTION_TRAIN_SPLIT
from sslfg.schema import DataConfig

SHARD_MB = 256.0  # WebDataset's advice: shards of a few hundred MB stream well and are few
log = logging.getLogger(__name__)


def splits_of(data: DataConfig) -> list[str]:
    """The splits of `data` that exist, each once: data.train_split, val_split, test_split and the split the
    evaluations' selections pair with val_split (`sslfg.evaluation.selection`); the folder layout: data.train_split."""
    if data.format == "folder":
        return [data.train_split]
    names = dict.fromkeys((data.train_split, data.val_split, data.test_split, SELECTION_TRAIN_SPLIT))
    return [s for s in names if split_exists(data, s)]


def write_shards(data: DataConfig, out: str, shard_mb: float = SHARD_MB) -> list[str]:
    """Writes every split of `data` (`splits_of`) as shards into the new folder `out`; returns the splits."""
    if data.format == "shards":
        raise ConfigError("data.format is already shards; the writer reads a csv, imagefolder or folder dataset.")
    if not shard_mb > 0:
        raise ConfigError(f"--shard-mb must be positive, got {shard_mb}")
    # as every command: not into the folder it reads (a folder layout would read the shards' folder next time)
    root = os.path.abspath(data.root)
    check_output_dir(out, "--out", [data.root], f"--out {root.rstrip(os.sep)}_shards")
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ConfigError(f"--out {out} exists and is not an empty folder; the shard writer never overwrites: name a "
                          "new folder.")
    splits = splits_of(data)
    if not splits:
        build_dataset(data, data.train_split)  # no split exists: its error names the root and what is there
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create it: {err}. Choose a writable folder.") from err
    try:
        os.chmod(tmp, 0o755)
        for split in splits:
            _write_split(build_dataset(data, split), split, tmp, int(shard_mb * 2**20))
        os.rename(tmp, out)  # fails (nothing overwritten) if something else filled `out` meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return splits


def _write_split(dataset: Any, split: str, out: str, shard_bytes: int) -> None:
    n = len(dataset)
    index = {"shard": np.zeros(n, np.uint32), "offset": np.zeros(n, np.int64), "nbytes": np.zeros(n, np.uint32),
             "label": np.asarray(dataset.labels, np.int32), "size": np.zeros((n, 2), np.int32),
             "ext": np.zeros(n, np.uint8)}
    if dataset.boxes is not None:
        index["box"] = np.asarray(dataset.boxes, np.float64).reshape(n, 4)
    labelled = dataset.num_classes > 0
    extensions: list[str] = []
    shards: list[dict[str, Any]] = []
    tar = None
    for i in range(n):
        if tar is None or tar.offset >= shard_bytes:
            if tar is not None:
                shards[-1]["filesize"] = _close(tar)
            tar = tarfile.open(os.path.join(out, shard_name(split, len(shards))), "w", format=tarfile.USTAR_FORMAT)
            shards.append({"url": shard_name(split, len(shards)), "nsamples": 0})
        data, size, ext = _checked_image(dataset, i)
        if ext not in extensions:
            extensions.append(ext)
        key = sample_key(i)
        index["shard"][i], index["nbytes"][i], index["size"][i] = len(shards) - 1, len(data), size
        index["offset"][i], index["ext"][i] = _add(tar, f"{key}.{ext}", data), extensions.index(ext)
        if labelled:
            _add(tar, f"{key}.cls", str(int(dataset.labels[i])).encode())
        about = {"label": int(dataset.labels[i]) if labelled else None, "size": list(size),
                 "source": os.path.relpath(dataset.paths[i], dataset.root)}
        if dataset.boxes is not None:
            about["box"] = list(dataset.boxes[i])
        _add(tar, f"{key}.json", json.dumps(about).encode())
        shards[-1]["nsamples"] += 1
    assert tar is not None  # every dataset has an image
    shards[-1]["filesize"] = _close(tar)
    np.savez(os.path.join(out, f"{split}.npz"), **index)
    # wids' dataset description (wids_version, name, shardlist of url/nsamples/filesize, urls relative to this
    # file) plus sslfg's keys: wids.ShardListDataset reads the split from this file as it is
    meta = {"format": FORMAT_VERSION, "wids_version": 1, "name": split, "split": split, "source": dataset.source,
            "samples": n, "shardlist": shards,
            "classes": list(dataset.classes) if labelled else [], "boxes": dataset.boxes is not None,
            "extensions": extensions, "overlaps_train": dataset.overlaps_train, "skipped": len(dataset.skipped)}
    with open(os.path.join(out, f"{split}.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    log.info("%s: %d images in %d shards (%s)", split, n, len(shards), dataset.source)


def _checked_image(dataset: Any, index: int) -> tuple[bytes, tuple[int, int], str]:
    """The file bytes of image `index`, its size as loaded and its WebDataset extension (from the content);
    DataError naming the file and where it is listed when the readers would refuse it."""
    path = dataset.paths[index]
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = decode_image(data, path, dataset.max_pixels, fix="re-encode or re-download it, or remove it from the "
                                                                "dataset")
        with Image.open(io.BytesIO(data)) as header:
            ext = {"JPEG": "jpg", "MPO": "jpg"}.get(header.format or "", (header.format or "img").lower())
    except (OSError, DataError) as err:
        raise DataError(f"{err} (listed in {dataset._origin(index)})") from err
    return data, img.size, ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Adds member `name` (reproducibly: no time or owner) and returns the byte offset of its data."""
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # the data ends, padded, at offset


def _close(tar: tarfile.TarFile) -> int:
    """Closes a shard; its size in bytes."""
    tar.close()
    assert tar.name is not None
    return os.path.getsize(tar.name)


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = command_parser(__doc__)
    parser.add_argument("--config", metavar="PATH", action="append", default=[], required=True,
                        help="recipe whose data section describes the dataset (repeat to merge several)")
    parser.add_argument("--out", metavar="DIR", required=True, help="new or empty folder for the shards")
    parser.add_argument("--shard-mb", type=float, default=SHARD_MB, help=f"shard size in MiB (default {SHARD_MB:g})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied after the YAML")
    args = parser.parse_intermixed_args(argv)
    data = load_data_config(args.config, args.overrides)
    splits = write_shards(data, args.out, args.shard_mb)
    print(f"wrote {', '.join(splits)} to {os.path.abspath(args.out)}; read them with data.format=shards "
          f"data.root={args.out}")
    return splits


if __name__ == "__main__":
    sys.exit(run_cli(main))
