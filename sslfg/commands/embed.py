"""Embeddings out: the frozen features of any dataset, labelled or not, as .npy shards (sslfg.evaluation.embed).

    python -m eval.embed --checkpoint runs/sample_lodisc   # the run's own data, data.train_split
    python -m eval.embed --checkpoint runs/sample_lodisc --split test --dtype float16
    python -m eval.embed --checkpoint runs/sample_lodisc data.root=data/photos data.format=folder output_dir=runs/photos
    accelerate launch --multi_gpu --num_processes 2 -m eval.embed --checkpoint runs/sample_lodisc   # the same files

Writes to output_dir (default <run>/eval/embed-<split>): shard-00000.npy, ... ((rows, dim) arrays of --dtype,
--shard-size rows each, in dataset order), images.csv (index, path, and label when the data has labels; the shards
layout: index, shard, member, the tar file and the image's member in it) and
manifest.json (model, checkpoint, transform, dim, count, dtype, and which shards are complete). Images go
through the run's evaluation transform (data.image_size, mean, std, features.crop_ratio) and the backbone gives
features.kind. A rerun of a stopped embedding keeps its complete shards, also with other images (one stopped by a
bad image, rerun with data.on_bad_image=skip): those of unchanged images; a finished embedding of anything else, an
unfinished one of other settings and any other non-empty output_dir are refused. Without --dataset, --config or
data.root, a run directory's own data settings are used. --check validates the recipe and the data, builds the
backbone, prints the start-up summary and exits.
The console command `sslfg-embed` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from sslfg.cli import parse_eval_cli
from sslfg.evaluation.embed import run_embedding

OPTIONS = (("--split", "embed.split", str, "split to embed; default data.train_split"),
           ("--dtype", "embed.dtype", str, "float32 (default) or float16"),
           ("--shard-size", "embed.shard_size", int, "rows per .npy shard"))


def main(argv: Sequence[str] | None = None) -> dict:
    return run_embedding(parse_eval_cli(argv, __doc__, OPTIONS))

