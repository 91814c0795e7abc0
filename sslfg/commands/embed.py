"""Embeddings out: the frozen features of any dataset, labelled or not, as .npy shards (sslfg.evaluation.embed).

    python -m eval.embed --checkpoint runs/sample_lodisc   # the run's own data, data.train_split
    python -m eval.embed --checkpoint runs/sample_lodisc --split test --dtype float16
    python -m eval.embed --checkpoint runs/sample_lodisc data.root=data/photos data.format=folder output_dir=runs/photos
    accelerate launch --multi_gpu --num_processes 2 -m eval.embed --checkpoint runs/sample_lodisc   # the same files

Writes to output_dir (default <run>/eval/embed-<split>): shard-00000.npy, ... ((rows, dim) arrays of --dtype,
--shard-size rows each, in dataset order), images.csv (index, path, and label when the data has labels) and
manifest.json (model, checkpoint, transform, dim, count, dtype, and which shards are complete). Images go
through the run's evaluation transform (data.image_size, mean, std, features.crop_ratio) and the backbone gives
features.kind. A rerun of a stopped embedding keeps its complete shards; a non-empty output_dir that is not the
same embedding is refused. Without --dataset, --config or data.root, a run directory's own data settings are
used. --check validates the recipe and the data, builds the backbone, prints the start-up summary and exits.
The console command `sslfg-embed` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from sslfg.cli import console, parse_eval_cli, print_summary
from sslfg.config import ConfigError, load_config
from sslfg.data.datasets import build_dataset
from sslfg.data.transforms import eval_transform
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.rundir import check_output_dir, claim_run_dir, ensure_writable
from sslfg.evaluation.embed import plan, previous, write_embeddings
from sslfg.evaluation.run import build_backbone, output_dir, run_data_defaults
from sslfg.schema import EvalConfig
from sslfg.summary import startup_summary

OPTIONS = (("--split", "embed.split", str, "split to embed; default data.train_split"),
           ("--dtype", "embed.dtype", str, "float32 (default) or float16"),
           ("--shard-size", "embed.shard_size", int, "rows per .npy shard"))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_eval_cli(argv, __doc__, OPTIONS)
    cfg, sources, data_note = run_data_defaults(load_config(args.files, args.overrides, EvalConfig))
    if cfg.output:
        raise ConfigError("output: eval.embed writes no metrics file; name its folder with output_dir=PATH")
    accelerator = make_accelerator()
    vit, info = build_backbone(cfg)
    split = cfg.embed.split or cfg.data.train_split
    d = cfg.data
    dataset = build_dataset(d, split, eval_transform(d.image_size, d.mean, d.std, cfg.features.crop_ratio))
    out = output_dir(cfg, info) if cfg.output_dir else output_dir(cfg, info) / f"embed-{split}"
    check_output_dir(cfg.output_dir or out)  # --check too
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


cli = console(main)
