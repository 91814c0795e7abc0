"""Feature extraction against the rest of a kNN evaluation, on the bundled sample data.

Times, in one run, each stage of `python -m eval.knn` on the sample (train_val bank 10,000 images,
test 2,000, 28 px) with the sample recipe's backbone: feature extraction of both splits (cache
off), kNN for all k, leave-one-out retrieval. Prints seconds per 1,000 images of extraction and
the share of the total it takes. Run `make data` first.

    python bench/eval_time.py [--checkpoint RUN_DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT

from sslfg.config import load_config
from sslfg.engine.accelerator import make_accelerator
from sslfg.evaluation.knn import knn_evaluate, retrieval_metrics
from sslfg.evaluation.run import EvalDatasets, build_backbone, split_features
from sslfg.schema import EvalConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="", help="a run directory; default: the sample recipe's ViT, random")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    overrides = ["features.cache=false", f"data.root={ROOT / 'data/sample'}"]
    overrides += [f"checkpoint={args.checkpoint}"] if args.checkpoint else [
        "random_init=true", "model=vit_tiny_patch16_224",
        "model_kwargs={patch_size: 4, embed_dim: 128, depth: 4, num_heads: 4}"]
    cfg = load_config(ROOT / "configs/datasets/sample.yaml", overrides, EvalConfig)
    accelerator = make_accelerator()
    vit, _ = build_backbone(cfg)
    stages: dict[str, list[float]] = {"extraction": [], "knn": [], "retrieval": []}
    for _ in range(args.repeats):
        tic = time.perf_counter()
        # built anew each round: the extraction includes reading the splits
        datasets = EvalDatasets(cfg.data, cfg.features.crop_ratio)
        bank, bank_labels, _ = split_features(cfg, vit, accelerator, datasets, cfg.data.train_split, ROOT / "runs")
        queries, query_labels, _ = split_features(cfg, vit, accelerator, datasets, cfg.data.test_split, ROOT / "runs")
        stages["extraction"].append(time.perf_counter() - tic)
        tic = time.perf_counter()
        knn_evaluate(bank, bank_labels, queries, query_labels, ks=cfg.knn.ks, temperature=cfg.knn.temperature)
        stages["knn"].append(time.perf_counter() - tic)
        tic = time.perf_counter()
        retrieval_metrics(queries, query_labels)
        stages["retrieval"].append(time.perf_counter() - tic)
    images = len(bank) + len(queries)
    median = {k: statistics.median(v) for k, v in stages.items()}
    total = sum(median.values())
    print(f"{images} images, {torch.get_num_threads()} threads, median of {args.repeats}\n")
    print("| stage | s | share |\n|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f} % |")
    print(f"\nextraction: {1000 * median['extraction'] / images:.2f} s per 1,000 images")


if __name__ == "__main__":
    main()
