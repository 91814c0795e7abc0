"""Shared fixtures: a tiny real-image dataset in the csv-split layout and a tiny pretraining config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslfg.schema import PretrainConfig

# Every in-process Accelerator of the suite runs on the CPU, also on a GPU machine: the resume tests compare
# runs bitwise, which GPU kernels do not promise. accelerate reads this when it picks the device; tests
# written for a GPU use torch.cuda directly, which stays visible. Subprocesses inherit it
# (tests/reliability/procs.py also hides CUDA from those that `accelerate launch` starts).
os.environ["ACCELERATE_USE_CPU"] = "true"

TINY_MODEL = dict(name="vit_tiny_patch16_224", patch_size=4, kwargs=dict(embed_dim=32, depth=2, num_heads=2),
                  proj_hidden_dim=64, pred_hidden_dim=64)


def write_csv_dataset(root: Path, n_train: int = 24, n_test: int = 8, size: int = 16, classes: int = 3) -> Path:
    """Images of a bright square on noise whose colour depends on the class, in the GLSim layout."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (classes, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        rows = ["class_id,dir"]
        for i in range(n):
            c = i % classes
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            img[y : y + size // 2, x : x + size // 2] = colours[c]
            rel = f"{split}/{c}/{i:04d}.png"
            (root / "images" / split / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / rel)
            rows.append(f"{c},{rel}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    (root / "train_val.csv").write_text((root / "train.csv").read_text())
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("tiny_data"))


def tiny_config(data_root: Path, output_dir: Path, **train: object) -> PretrainConfig:
    cfg = PretrainConfig(output_dir=str(output_dir), seed=0)
    cfg.data.root, cfg.data.image_size, cfg.data.num_workers, cfg.data.train_split = str(data_root), 16, 0, "train"
    for key, value in TINY_MODEL.items():
        setattr(cfg.model, key, value)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.log_every = 2, 8, 2, 1
    cfg.train.figure_samples = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg
