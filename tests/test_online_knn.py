"""Online kNN during pretraining: the DINO kNN of a bounded subset, and no effect on the training itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from sslfg.data.datasets import build_dataset
from sslfg.data.transforms import eval_transform
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.evaluation.knn import knn_evaluate
from sslfg.evaluation.online import OnlineKnn
from sslfg.models.backbone import forward_tokens
from sslfg.pretrain import pretrain
from sslfg.weights import load_backbone
from tests.conftest import tiny_config


def test_online_knn_is_the_knn_of_evenly_spaced_subsets(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=2, figure_samples=0)
    cfg.train.knn_samples = 20  # the fewest a k-20 kNN takes
    vit = load_backbone(pretrain(cfg))
    got = OnlineKnn(cfg, make_accelerator())(vit)
    assert vit.training  # handed back in training mode

    # Reference: the CLS features of images floor(i·23/19), i < 20 (train) and all 8 test images.
    transform = eval_transform(16, cfg.data.mean, cfg.data.std)
    vit.eval()

    def embed(split: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_dataset(cfg.data, split, transform)
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in idx])
            return forward_tokens(vit, x)[:, 0], torch.tensor([ds.labels[i] for i in idx])

    bank, bank_labels = embed("train", [i * 23 // 19 for i in range(20)])
    queries, labels = embed("test", list(range(8)))
    expected = knn_evaluate(bank, bank_labels, queries, labels, ks=[20], backend="torch")["knn.k20.top1"]
    assert got == {"online_knn.k20.top1": expected}


def test_online_knn_leaves_the_training_run_unchanged(tiny_data: Path, tmp_path: Path) -> None:
    runs = {}
    for every in (0, 1):
        cfg = tiny_config(tiny_data, tmp_path / f"knn{every}", figure_samples=0)  # 2 epochs of 3 steps
        cfg.train.knn_every, cfg.train.knn_samples = every, 20
        cfg.method.mocov3.predictor_dropout = 0.2  # a random op in every step: the evaluation must not shift its stream
        runs[every] = pretrain(cfg)
    weights = [load_file(str(checkpoint_dirs(r)[-1] / "model.safetensors")) for r in runs.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "online_knn.k20.top1" in r] == [0, 3, 6]
    plain = [r for r in records if "loss" in r]
    assert plain == [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]


def test_online_knn_reads_eval_data(tmp_path: Path, tiny_data: Path) -> None:
    """On unlabelled data it reads eval_data, at the run's image size and normalisation (was: an error at step 0;
    without eval_data it is now off: tests/test_unlabelled.py)."""
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.data.format, cfg.data.root, cfg.train.knn_every = "folder", str(tiny_data / "images"), 1
    cfg.eval_data.root, cfg.eval_data.train_split = str(tiny_data), "train"
    knn = OnlineKnn(cfg, make_accelerator())
    assert (len(knn.bank), len(knn.queries)) == (24, 8)
    assert knn.bank[0][0].shape == (3, 16, 16) and knn.bank[0][1] == 0
