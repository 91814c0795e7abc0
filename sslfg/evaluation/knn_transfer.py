"""eval.knn's measurement: kNN classification (DINO protocol) of the test split against the training split,
leave-one-out retrieval over the test split, knn.correct.json and the figures (sslfg/commands/knn.py: its options)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from sslfg.data.images import DataError
from sslfg.evaluation.knn import accuracies, knn_evaluate, knn_hits, resolve_backend, retrieval_metrics, usable_ks
from sslfg.evaluation.run import EvalDatasets, skipped_images, split_features
from sslfg.evaluation.selection import selection_features
from sslfg.figures import save_embedding_map, save_neighbour_grid
from sslfg.schema import EvalConfig
from sslfg.verdicts import correct_path, write_correct

GRID_QUERIES, GRID_NEIGHBOURS = 8, 5
MIN_TEST_IMAGES = 2  # leave-one-out retrieval and t-SNE need another test image
NO_MAP = "n/a: every class has one test image, so no query has another image of its class to retrieve"
log = logging.getLogger(__name__)


def neighbour_figure(bank, bank_labels, bank_ds, queries, query_labels, query_ds, path: Path, seed: int) -> None:
    """A few test queries with their nearest training images."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(queries), generator=g)[:GRID_QUERIES]
    sims = F.normalize(queries[picks], dim=1) @ F.normalize(bank, dim=1).T
    nearest = sims.topk(min(GRID_NEIGHBOURS, len(bank)), dim=1).indices
    save_neighbour_grid(
        [query_ds.image(i) for i in picks.tolist()],
        [[bank_ds.image(j) for j in row] for row in nearest.tolist()],
        [[bool(bank_labels[j] == query_labels[i]) for j in row] for i, row in zip(picks.tolist(), nearest.tolist(),
                                                                                   strict=True)],
        path,
    )


def knn_transfer(cfg: EvalConfig, vit, accelerator, out: Path, datasets: EvalDatasets) -> tuple[dict, dict] | None:
    """Features of bank and queries on every process; kNN, retrieval and figures on the main one."""
    bank, bank_labels, bank_ds = split_features(cfg, vit, accelerator, datasets, cfg.data.train_split, out)
    queries, query_labels, query_ds = split_features(cfg, vit, accelerator, datasets, cfg.data.test_split, out)
    k, device = cfg.knn, accelerator.device
    if k.val:  # on every process: the features are extracted in shards
        fit, val, _, selection = selection_features(cfg, vit, accelerator, out, datasets, (bank, bank_labels),
                                                    cfg.linear.val_fraction, "fine-tuning init")
    if not accelerator.is_main_process:
        return None
    backend, why = resolve_backend(k.backend, device)
    log.info("kNN search: %s on %s (%s)", backend, device, why)
    search = {"ks": k.ks, "temperature": k.temperature, "backend": backend, "device": device, "float16": k.float16}
    hits = knn_hits(bank, bank_labels, queries, query_labels, **search)
    write_correct(correct_path(out, "knn"), cfg.data.test_split, {key: h for key, h in hits.items() if "top1" in key})
    metrics = accuracies(hits)
    if k.val:
        metrics |= {f"val.{key}": v for key, v in knn_evaluate(*fit, *val, **search).items()}
    notes = {}
    if k.retrieval:
        retrieval = retrieval_metrics(queries, query_labels, device=device)
        if math.isnan(retrieval["mAP"]):  # no query has another image of its class: not a number to print
            del retrieval["mAP"]
            notes["retrieval_mAP"] = NO_MAP
            log.warning("retrieval.mAP: %s (%s); it is left out of the metrics", NO_MAP, cfg.data.test_split)
        metrics |= {f"retrieval.{name}": v for name, v in retrieval.items()}
    protocol = {"name": "knn", "bank_split": cfg.data.train_split, "query_split": cfg.data.test_split,
                "ks": usable_ks(k.ks, len(bank)), "ks_requested": k.ks,  # a k above the bank size is dropped
                "temperature": k.temperature, "similarity": "cosine", "weights": "exp(sim/T)",
                "backend": backend, "search_device": device.type, "float16_bank": k.float16,
                "bank_size": len(bank), "queries": len(queries),
                "skipped_images": skipped_images(bank_ds, query_ds), **notes}
    if k.val:
        protocol |= {"val_bank_split": selection["selection_train_split"],
                     "val_query_split": selection["selection_split"]}
    if k.figures:
        neighbour_figure(bank, bank_labels, bank_ds, queries, query_labels, query_ds,
                         out / "figures" / "knn_neighbours.png", cfg.seed)
        names = query_ds.classes or [str(c) for c in range(query_ds.num_classes)]
        save_embedding_map(queries, query_labels, names, out / "figures" / "tsne_test.png", cfg.seed)
    return metrics, protocol


def check_test_split(cfg: EvalConfig, datasets: dict) -> None:
    """Leave-one-out retrieval and the t-SNE map need two test images: refused at start-up (and by --check),
    not after the features are extracted."""
    k, split = cfg.knn, cfg.data.test_split
    test = datasets[split]
    if (k.retrieval or k.figures) and len(test) < MIN_TEST_IMAGES:
        raise DataError(f"data.test_split '{split}' ({test.source}) has {len(test)} image; eval.knn needs at least "
                        f"{MIN_TEST_IMAGES} for leave-one-out retrieval and the t-SNE map. Add test images, or set "
                        "knn.retrieval=false knn.figures=false.")
