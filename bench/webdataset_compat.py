"""Not a timing first: whether webdataset and wids read sslfg's shards (issue 25) as sslfg reads them. For each
split of a shards folder: webdataset's streaming reader over the split's tar files (in order, no shuffle) and wids'
index-addressable ShardListDataset opened on the split's json, each compared sample by sample with sslfg's
ShardDataset: key, decoded pixels, label (.cls), label/size/box (.json). Then images/s of the three readers decoding
the split in order (one process; wids opens the tar files where they are, nothing is copied). Exits 1 on any
difference. Needs webdataset and wids, which sslfg does not depend on:

    pip install webdataset wids
    python -m sslfg.data.shards --config configs/datasets/sample.yaml --out data/sample_shards   # once
    python bench/webdataset_compat.py [--shards data/sample_shards] [--splits train test]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import webdataset as wds
import wids
from common import ROOT, markdown_table
from PIL import Image

from sslfg.data.shard_reader import ShardDataset


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def webdataset_samples(root: Path, split: str):
    meta = json.loads((root / f"{split}.json").read_text())
    urls = [str(root / s["url"]) for s in meta["shardlist"]]
    return wds.WebDataset(urls, shardshuffle=False).decode("pil")


def wids_samples(root: Path, split: str):
    dataset = wids.ShardListDataset(str(root / f"{split}.json"), localname=lambda url: url)
    return (dataset[i] for i in range(len(dataset)))


def compare(ours: ShardDataset, theirs, boxes: bool) -> list[str]:
    """Differences between sslfg's reading of a split and another reader's samples (dicts keyed by extension)."""
    problems, n = [], 0
    for i, sample in enumerate(theirs):
        n += 1
        if i >= len(ours):
            continue
        img, label = ours[i]
        key, ext = ours.member(i)[1].split(".", 1)
        # webdataset names a member's part by its extension, wids by ".<extension>"; both decode to PIL/int/dict
        part = {name.lstrip("."): value for name, value in sample.items()}
        checks = {"key": part["__key__"] == key, "pixels": np.array_equal(pixels(part[ext]), pixels(img)),
                  "label": part["json"]["label"] == (label if label >= 0 else None)
                  and part.get("cls", label) == label,
                  "size": list(part["json"]["size"]) == list(ours.sizes[i]),
                  "box": not boxes or np.allclose(part["json"]["box"], ours.boxes[i])}
        problems += [f"sample {i} ({key}): {what} differs" for what, ok in checks.items() if not ok]
    if n != len(ours):
        problems.append(f"{n} samples read, sslfg indexes {len(ours)}")
    return problems


def rate(samples) -> float:
    tic = time.perf_counter()
    return sum(1 for _ in samples) / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=str(ROOT / "data/sample_shards"))
    parser.add_argument("--splits", nargs="+", default=["train", "test"])
    args = parser.parse_args()
    root = Path(args.shards).resolve()
    rows, failed = [], False
    for split in args.splits:
        meta = json.loads((root / f"{split}.json").read_text())
        ours = ShardDataset(str(root), split, labelled=bool(meta["classes"]), boxes=meta["boxes"])
        for reader, samples in (("webdataset", webdataset_samples), ("wids", wids_samples)):
            problems = compare(ours, samples(root, split), meta["boxes"])
            failed |= bool(problems)
            speed = rate(samples(root, split))
            rows.append([split, reader, str(len(ours)), "equal" if not problems else "; ".join(problems[:3]),
                         f"{speed:.0f}"])
        rows.append([split, "sslfg ShardDataset", str(len(ours)), "(the reference)",
                     f"{rate(ours[i] for i in range(len(ours))):.0f}"])
    print(f"webdataset {wds.__version__}, shards {root}\n")
    print(markdown_table(["split", "reader", "samples", "every key, image, label, size, box", "images/s (decoded)"],
                         rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
