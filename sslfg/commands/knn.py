"""kNN classification (DINO protocol) and leave-one-out retrieval (LoDisc protocol) on frozen features.

    python -m eval.knn --checkpoint runs/lodisc_cub   # on the run's own data (its config.yaml)
    python -m eval.knn --checkpoint runs/lodisc_cub --dataset configs/datasets/cub.yaml --check
    python -m eval.knn --checkpoint vit_s.safetensors --model vit_small_patch16_224 --dataset configs/datasets/cub.yaml
    python -m eval.knn --random-init --checkpoint runs/lodisc_cub   # the floor, same architecture
    accelerate launch --multi_gpu --num_processes 2 -m eval.knn --checkpoint runs/lodisc_cub   # same numbers

Bank = data.train_split, queries = data.test_split; retrieval runs over the test split. Unless
--dataset or --config names the data, a run directory's own data settings fill every data key the
command line leaves unset (so data.root=PATH evaluates the run's kind of data in another folder);
the summary's data.settings says which key came from where. --check validates the recipe and the
data, builds the backbone, prints the start-up summary and exits.
The console command `sslfg-knn` takes the same arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from sslfg.cli import console, run_evaluation
from sslfg.evaluation import skipped_images, split_features
from sslfg.figures import save_embedding_map, save_neighbour_grid
from sslfg.knn import knn_evaluate, resolve_backend, retrieval_metrics, usable_ks
from sslfg.schema import EvalConfig

GRID_QUERIES, GRID_NEIGHBOURS = 8, 5
log = logging.getLogger(__name__)


def neighbour_figure(bank, bank_labels, bank_ds, queries, query_labels, query_ds, path: Path, seed: int) -> None:
    """A few test queries with their nearest training images."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(queries), generator=g)[:GRID_QUERIES]
    sims = F.normalize(queries[picks], dim=1) @ F.normalize(bank, dim=1).T
    nearest = sims.topk(min(GRID_NEIGHBOURS, len(bank)), dim=1).indices
    save_neighbour_grid(
        [query_ds.paths[i] for i in picks.tolist()],
        [[bank_ds.paths[j] for j in row] for row in nearest.tolist()],
        [[bool(bank_labels[j] == query_labels[i]) for j in row] for i, row in zip(picks.tolist(), nearest.tolist(),
                                                                                   strict=True)],
        path,
    )


def knn_transfer(cfg: EvalConfig, vit, accelerator, out: Path) -> tuple[dict, dict] | None:
    """Features of bank and queries on every process; kNN, retrieval and figures on the main one."""
    bank, bank_labels, bank_ds = split_features(cfg, vit, accelerator, cfg.data.train_split, out)
    queries, query_labels, query_ds = split_features(cfg, vit, accelerator, cfg.data.test_split, out)
    if not accelerator.is_main_process:
        return None
    k, device = cfg.knn, accelerator.device
    backend, why = resolve_backend(k.backend, device)
    log.info("kNN search: %s on %s (%s)", backend, device, why)
    metrics = knn_evaluate(bank, bank_labels, queries, query_labels, ks=k.ks, temperature=k.temperature,
                           backend=backend, device=device, float16=k.float16)
    if k.retrieval:
        retrieval = retrieval_metrics(queries, query_labels, device=device)
        metrics |= {f"retrieval.{name}": v for name, v in retrieval.items()}
    protocol = {"name": "knn", "bank_split": cfg.data.train_split, "query_split": cfg.data.test_split,
                "ks": usable_ks(k.ks, len(bank)), "ks_requested": k.ks,  # a k above the bank size is dropped
                "temperature": k.temperature, "similarity": "cosine", "weights": "exp(sim/T)",
                "backend": backend, "search_device": device.type, "float16_bank": k.float16,
                "bank_size": len(bank), "queries": len(queries),
                "skipped_images": skipped_images(bank_ds, query_ds)}
    if k.figures:
        neighbour_figure(bank, bank_labels, bank_ds, queries, query_labels, query_ds,
                         out / "figures" / "knn_neighbours.png", cfg.seed)
        names = query_ds.classes or [str(c) for c in range(query_ds.num_classes)]
        save_embedding_map(queries, query_labels, names, out / "figures" / "tsne_test.png", cfg.seed)
    return metrics, protocol


def main(argv: Sequence[str] | None = None) -> dict:
    return run_evaluation(argv, __doc__, "knn", knn_transfer)


cli = console(main)
