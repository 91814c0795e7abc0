"""Run by tests/data/test_shards.py under `accelerate launch` (two gloo processes): reads the shards at argv[1]
through the training loader for epochs 0 and 1 and writes, per process, the sha256 of every image it got to
argv[2]/rank<r>.json."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

from sslfg.data.loader import EpochBatchSampler, seeded_loader
from sslfg.data.shard_reader import ShardDataset


def digest(img: Image.Image) -> str:
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


def main(shards: str, out: str) -> None:
    a = Accelerator(cpu=True)
    dataset = ShardDataset(shards, "train", transform=digest)
    sampler = EpochBatchSampler(len(dataset), 4, a.process_index, a.num_processes, seed=0)
    loader = seeded_loader(dataset, sampler, num_workers=1)
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen[epoch] = [d for digests, _ in loader for d in digests]
    Path(out, f"rank{a.process_index}.json").write_text(json.dumps({"world": a.num_processes, "seen": seen}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
