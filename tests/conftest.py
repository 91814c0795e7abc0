"""Shared fixtures: a tiny real-image dataset in the csv-split layout and a tiny pretraining config."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslfg.methods import METHODS, MomentumMethod, build_method
from sslfg.schema import PretrainConfig

# Every in-process Accelerator of the suite runs on the CPU, also on a GPU machine: the resume tests compare
# runs bitwise, which GPU kernels do not promise. accelerate reads this when it picks the device; tests
# written for a GPU use torch.cuda directly, which stays visible. Subprocesses inherit it
# (tests/reliability/procs.py also hides CUDA from those that `accelerate launch` starts).
os.environ["ACCELERATE_USE_CPU"] = "true"

TINY_MODEL = dict(name="vit_tiny_patch16_224", patch_size=4, kwargs=dict(embed_dim=32, depth=2, num_heads=2))
# every head width of every registered method (its method.<name>.*_dim keys) at 64: tiny heads for any method
TINY_HEADS = {f"method.{name}.{f.name}": 64 for name, cls in METHODS.items()
              for f in dataclasses.fields(cls.Config) if f.name.endswith("_dim")}
# the same as a recipe's `method` mapping: {"mocov3": {"proj_hidden_dim": 64, ...}, ...}
TINY_METHOD: dict[str, dict[str, int]] = {}
for _key, _value in TINY_HEADS.items():
    _, _name, _field = _key.split(".")
    TINY_METHOD.setdefault(_name, {})[_field] = _value


def set_keys(cfg: object, dotted: dict[str, object]) -> None:
    """Sets dotted keys ("method.mocov3.temperature") of a config dataclass tree in place."""
    for key, value in dotted.items():
        *path, last = key.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)


def write_csv_dataset(root: Path, n_train: int = 24, n_test: int = 8, size: int = 16, classes: int = 3,
                      boxes: bool = False) -> Path:
    """Images of a bright square on noise whose colour depends on the class, in the GLSim layout; `boxes` adds the
    square's box as the columns x0,y0,x1,y1."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (classes, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        rows = ["class_id,dir" + (",x0,y0,x1,y1" if boxes else "")]
        for i in range(n):
            c = i % classes
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            img[y : y + size // 2, x : x + size // 2] = colours[c]
            rel = f"{split}/{c}/{i:04d}.png"
            (root / "images" / split / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / rel)
            rows.append(f"{c},{rel}" + (f",{x},{y},{x + size // 2},{y + size // 2}" if boxes else ""))
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
    set_keys(cfg, TINY_HEADS)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.log_every = 2, 8, 2, 1
    cfg.train.figure_samples = 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def tiny_method(name: str = "mocov3", **dotted: object) -> MomentumMethod:
    """Method `name` with tiny heads on the tiny ViT at 16 px (a 4x4 grid), in training mode, seed 0;
    `dotted` sets keys of its PretrainConfig, e.g. tiny_method(**{"method.local.weight": 0})."""
    cfg = PretrainConfig()
    for key, value in TINY_MODEL.items():
        setattr(cfg.model, key, value)
    set_keys(cfg, {**TINY_HEADS, "method.name": name, **dotted})
    torch.manual_seed(0)
    return build_method(cfg.model, cfg.method, image_size=16).train()
