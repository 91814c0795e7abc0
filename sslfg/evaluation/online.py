"""Online kNN during pretraining: a bounded labelled subset embedded every few epochs, so that a
user sees progress (or collapse) while training rather than after it."""

from __future__ import annotations

import dataclasses

import torch
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Subset

from sslfg.config import ConfigError
from sslfg.data.datasets import build_dataset
from sslfg.data.transforms import eval_transform
from sslfg.evaluation.features import extract_features
from sslfg.evaluation.knn import knn_evaluate
from sslfg.schema import DataConfig, PretrainConfig

K = 20


def evaluation_data(cfg: PretrainConfig) -> DataConfig:
    """What the online evaluations read: `eval_data`'s labelled dataset at the run's image size and normalisation
    when eval_data.root is set, else `data`."""
    if not cfg.eval_data.root:
        return cfg.data
    return dataclasses.replace(cfg.data, **dataclasses.asdict(cfg.eval_data), labels=True)


class OnlineKnn:
    """kNN top-1 (k 20, DINO protocol, CLS features) of up to `train.knn_samples` evenly spaced
    test images against as many training images, of `evaluation_data` (labelled)."""

    def __init__(self, cfg: PretrainConfig, accelerator: Accelerator) -> None:
        data = evaluation_data(cfg)
        transform = eval_transform(data.image_size, data.mean, data.std)
        bank = build_dataset(data, data.train_split, transform)
        queries = build_dataset(data, data.test_split, transform)
        self.bank, self.queries = (_evenly_spaced(d, cfg.train.knn_samples) for d in (bank, queries))
        if len(self.bank) < K:  # a smaller bank would answer k 20 with fewer neighbours under the k20 name
            raise ConfigError(f"train.knn_samples: the online kNN (k {K}) needs at least {K} bank images, got "
                              f"{len(self.bank)} (train.knn_samples={cfg.train.knn_samples}, {len(bank)} in "
                              f"{bank.source}); raise train.knn_samples or set train.knn_every=0")
        self.accelerator = accelerator
        self.batch_size = cfg.train.batch_size

    def __call__(self, vit: VisionTransformer) -> dict[str, float]:
        # Its own RNG state: evaluating must not change the training run's random stream.
        with torch.random.fork_rng(devices=[]):
            bank, bank_labels, queries, labels = (
                t for d in (self.bank, self.queries)
                for t in extract_features(vit, d, self.accelerator, self.batch_size, num_workers=0, desc="online knn")
            )
        vit.train()
        top1 = knn_evaluate(bank, bank_labels, queries, labels, ks=[K], backend="torch")[f"knn.k{K}.top1"]
        return {f"online_knn.k{K}.top1": top1}


def _evenly_spaced(dataset, n: int) -> Subset:
    return Subset(dataset, torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist())
