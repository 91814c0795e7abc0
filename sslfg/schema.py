"""The configuration schema: every key a recipe may set, with its type and default.

`sslfg.config.load_config(path, overrides, PretrainConfig)` fills these from YAML; an unknown key
or a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Where the images are and how they are laid out (METHODS §5)."""

    root: str = ""  # dataset folder; required for every real run
    format: Literal["csv", "imagefolder", "folder"] = "csv"
    images_dir: str = "images"  # csv layout: folder the `dir` column is relative to
    train_split: str = "train_val"  # csv: <split>.csv; imagefolder: root/<split>/
    val_split: str = "val"
    test_split: str = "test"
    num_classes: int = 0  # 0: infer from the data
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_workers: int = 4


@dataclass
class AugmentConfig:
    """Two-view BYOL-asymmetric augmentations (METHODS §1)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # view 1, view 2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    flip_p: float = 0.5


@dataclass
class ModelConfig:
    """Backbone plus the LoDisc method (METHODS §1)."""

    name: str = "vit_small_patch16_224"  # any timm ViT
    patch_size: int = 0  # 0: the timm default for `name`
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (embed_dim, depth, ...)
    weights: str = ""  # local weights file (safetensors or a torch state dict); "" = from scratch
    drop_path_rate: float = 0.0
    use_projector: bool = True  # false reproduces the reference code, which never runs it
    proj_hidden_dim: int = 4096
    pred_hidden_dim: int = 4096
    predictor_dropout: float = 0.2
    temperature: float = 0.2
    local_weight: float = 1.0  # 0 gives plain MoCo v3
    local_view: Literal["zero_fill", "drop_tokens"] = "zero_fill"
    keep_ratio: float = 0.30


@dataclass
class TrainConfig:
    """Optimisation, schedules and checkpoints of the training loop."""

    epochs: int = 100
    max_steps: int = 0  # >0 stops after this many optimizer steps; schedules still follow `epochs`
    batch_size: int = 256  # per process
    grad_accum_steps: int = 1
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.1
    weight_decay_end: float = -1.0  # <0: constant weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # torch AdamW defaults, as MoCo v3
    momentum: float = 0.99  # EMA m0, cosine to 1
    clip_grad: float = 0.0  # 0: no clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 500  # optimizer steps
    keep_checkpoints: int = 2
    log_every: int = 10
    figure_samples: int = 6  # training images in the mask figure; 0 disables it


@dataclass
class PretrainConfig:
    """Everything `train_ssl.py` reads."""

    output_dir: str = "runs/pretrain"
    seed: int = 0
    resume: str = ""  # "" | "auto" | path to a checkpoint directory
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
