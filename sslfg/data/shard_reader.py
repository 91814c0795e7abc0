"""The shards layout (`data.format: shards`): a split as WebDataset tar shards plus an index over their offsets.

`python -m sslfg.data.shards` writes it (see there); per split `<split>` the folder `data.root` holds

- `<split>-000000.tar`, `<split>-000001.tar`, ...: members `<key>.<ext>` (the original image file, byte for byte),
  `<key>.cls` (the class id as text, labelled data only) and `<key>.json` (label, size, box, source file), so
  webdataset / wids read them too;
- `<split>.json`: the shard files with their sample counts and byte sizes (`shardlist`: `url`, `nsamples`,
  `filesize`, with `wids_version` and `name`: a wids dataset description), the class names, the split's source;
- `<split>.npz`: per sample, numbers only: shard number, byte offset and length of its image in the shard, class
  id, size (width, height) as loaded, extension number, and the box when the source had boxes.

`ShardDataset` keeps these arrays and nothing per sample besides them (33 bytes a sample, 65 with boxes: a
10 M-image index is 0.33 GB, 0.65 GB with boxes), and reads an image with one `os.pread` at its offset. It is
index-addressable, so the seeded sampler, per-sample seeds and exact mid-epoch resume work as on a folder.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from sslfg.data.datasets import LABELS_HINT, OnBadImage, Transform, _ImageListDataset, _summarise, split_not_found
from sslfg.data.images import MAX_PIXELS, DataError, decode_image

FORMAT_VERSION = 2  # 2: the shard list under wids' keys (1 had its own; rewrite such shards)
INDEX_ARRAYS = ("shard", "offset", "nbytes", "label", "size", "ext")  # "box" as well when the source had boxes
WRITER = "python -m sslfg.data.shards --config <dataset recipe> --out <new folder>"
log = logging.getLogger(__name__)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(row: int) -> str:
    """The WebDataset key of the split's `row`-th written sample (no dot: webdataset splits names at the first)."""
    return f"{row:09d}"


class ShardDataset(_ImageListDataset):
    """A split of the shards layout (see the module docstring). `labelled` False reads every label as -1 (no
    classes); `boxes` True needs a split written with boxes; `num_classes` > 0 must be the split's class count
    (data.num_classes). A shard that is missing or shorter than the index
    says is an error naming it, or with `on_bad_image="skip"` a warning, its unreadable samples then dropped
    by the skip scan like any unreadable image."""

    _per_sample = ("_shard", "_offset", "_nbytes", "labels", "sizes", "_ext", "boxes", "_key")

    def __init__(self, root: str, split: str, transform: Transform | None = None, on_bad_image: OnBadImage = "error",
                 labelled: bool = True, boxes: bool = False, max_pixels: int = MAX_PIXELS,
                 num_classes: int = 0) -> None:
        super().__init__(transform, on_bad_image, max_pixels)
        self.root = os.path.abspath(root)
        self.source = os.path.join(self.root, f"{split}.json")
        meta = _read_meta(self.source, self.root)
        index = _read_index(os.path.join(self.root, f"{split}.npz"), meta, boxes)
        self._shard, self._offset, self._nbytes = index["shard"], index["offset"], index["nbytes"]
        self._ext, self.sizes, self.boxes = index["ext"], index["size"], index.get("box") if boxes else None
        self._key = np.arange(len(self._shard), dtype=np.uint32)
        self._files = [os.path.join(self.root, s["url"]) for s in meta["shardlist"]]
        self._extensions: list[str] = meta["extensions"]
        if labelled and not meta["classes"]:
            raise DataError(f"{self.source}: these shards were written from a dataset without labels{LABELS_HINT}, "
                            "or write shards from a labelled dataset.")
        self.classes = meta["classes"] if labelled else []
        self.num_classes = len(self.classes)
        if labelled and 0 < num_classes != self.num_classes:
            raise DataError(f"{self.source} has {self.num_classes} classes but data.num_classes is {num_classes}; make "
                            "them agree (0 takes the count of the shards).")
        self.labels = index["label"] if labelled else np.full(len(self._shard), -1, dtype=np.int32)
        self.overlaps_train = meta["overlaps_train"]
        if self.overlaps_train:
            log.warning("%s: %d of its images are also in the training split (found when the shards were written); "
                        "test metrics on them measure memory, not generalisation.", self.source, self.overlaps_train)
        self._fds: dict[int, int] = {}
        self._check_shards(meta["shardlist"], on_bad_image)
        self._apply_policy(on_bad_image)

    @property
    def paths(self) -> ShardPaths:  # type: ignore[override]
        return ShardPaths(self)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self._load(index)
        return (self.transform(img) if self.transform is not None else img), int(self.labels[index])

    def member(self, index: int) -> tuple[str, str]:
        """(shard file, member name) of sample `index`."""
        key, ext = sample_key(int(self._key[index])), self._extensions[self._ext[index]]
        return self._files[self._shard[index]], f"{key}.{ext}"

    def _load(self, index: int) -> Image.Image:
        shard = int(self._shard[index])
        offset, size = int(self._offset[index]), int(self._nbytes[index])
        try:
            if shard not in self._fds:  # opened lazily in each process: a DataLoader worker opens its own
                self._fds[shard] = os.open(self._files[shard], os.O_RDONLY)
            data = os.pread(self._fds[shard], size, offset)
        except OSError as err:
            raise DataError(f"cannot read shard {self._files[shard]}: {err}. {_rewrite_hint(self.root)}") from err
        if len(data) < size:
            raise DataError(f"shard {self._files[shard]} ends at byte {offset + len(data)}, inside sample "
                            f"{self.member(index)[1]} (bytes {offset}..{offset + size}): it is truncated. "
                            f"{_rewrite_hint(self.root)}")
        return decode_image(data, f"{self._files[shard]}:{self.member(index)[1]}", self.max_pixels)

    def _origin(self, index: int) -> str:
        return f"{self.source}, sample {int(self._key[index])}"

    def _check_shards(self, shards: list[dict[str, Any]], on_bad_image: OnBadImage) -> None:
        """Every shard exists with the size the writer recorded; else an error naming them (a warning with skip)."""
        bad = []
        for path, shard in zip(self._files, shards, strict=True):
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size is None:
                bad.append(f"{path} is missing ({shard['nsamples']} samples)")
            elif size != shard["filesize"]:
                bad.append(f"{path} has {size} bytes, the index says {shard['filesize']} (truncated or replaced)")
        if not bad:
            return
        if on_bad_image == "error":
            raise DataError(f"{self.source}: {len(bad)} of its {len(shards)} shards are damaged: {_summarise(bad)}. "
                            f"{_rewrite_hint(self.root)} Or set data.on_bad_image=skip to drop their unreadable "
                            "samples.")
        for problem in bad:
            log.warning("data.on_bad_image=skip: %s; its unreadable samples are skipped", problem)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}  # file descriptors do not cross to a spawned worker

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class ShardPaths:
    """`paths` of a ShardDataset, made on demand: "<shard file>/<member>" (no string is kept per sample)."""

    def __init__(self, dataset: ShardDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset._shard)

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return os.path.join(*self.dataset.member(index))


def _rewrite_hint(root: str) -> str:
    return f"Write the shards of {root} again from the original dataset: {WRITER}."


def _read_meta(path: str, root: str) -> dict[str, Any]:
    if not os.path.isdir(root):
        raise DataError(f"data.root is not a folder of shards: {root}. Write one with {WRITER}.")
    if not os.path.isfile(path):
        split = os.path.basename(path).removesuffix(".json")
        raise DataError(f"{split_not_found('shards', root, split)}, or write its shards with {WRITER}.")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the shard index {path}: {err}. {_rewrite_hint(root)}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} is not a shard index of format {FORMAT_VERSION}. {_rewrite_hint(root)}")
    return meta


def _read_index(path: str, meta: dict[str, Any], boxes: bool) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            index = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read the shard index {path}: {err}. {_rewrite_hint(os.path.dirname(path))}") from err
    absent = [name for name in INDEX_ARRAYS if name not in index]
    lengths = {len(a) for a in index.values()}
    if absent or lengths != {meta["samples"]}:
        raise DataError(f"{path} is damaged (arrays {absent or 'of other lengths'} where {meta['samples']} samples "
                        f"are indexed). {_rewrite_hint(os.path.dirname(path))}")
    if boxes and "box" not in index:
        raise DataError(f"data.boxes is true but {path} has no object boxes (its source had none); set "
                        "data.boxes=false, or write the shards from a csv layout read with data.boxes=true.")
    return index
