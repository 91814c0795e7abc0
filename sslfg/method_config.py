"""The `method` section of a pretraining recipe: which method (`method.name`), LoDisc's local branch (`method.local`)
and each method's own keys (`method.<name>`). Plain dataclasses, no torch: `sslfg.schema` reads them without
importing the methods, which build the networks (`sslfg.methods`, whose `METHODS` names the same methods).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from sslfg.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, RATE, bounded


@dataclass
class LocalConfig:
    """`method.local`: the local branch, for every method."""

    weight: float = bounded(NON_NEGATIVE, 1.0)  # λ; 0 switches the branch off (plain MoCo v3, BYOL, DINO)
    view: Literal["zero_fill", "drop_tokens"] = "zero_fill"  # LoDisc's masked input; drop_tokens: only kept tokens
    keep_ratio: float = bounded("(0, 1]", 0.30)  # share of the patches kept, ⌊ratio·N⌋ of N (LoDisc: 0.30)
    # the location score sums the last n blocks' CLS attention; 0: every block (LoDisc)
    attention_layers: int = bounded(NON_NEGATIVE, 0)


@dataclass
class MoCoV3Config:
    """`method.mocov3`: LoDisc's heads and loss (MoCo v3's with Dropout 0.2; 0 gives MoCo v3's)."""

    momentum: float = bounded(RATE, 0.99)  # EMA m0, cosine to 1 (MoCo v3 --moco-m 0.99 --moco-m-cos)
    temperature: float = bounded(POSITIVE, 0.2)  # T of InfoNCE (MoCo v3 --moco-t 0.2 for ViTs)
    use_projector: bool = True  # false reproduces the LoDisc code, which builds the projector but never runs it
    proj_hidden_dim: int = bounded(AT_LEAST_1, 4096)  # hidden width of the 3-layer projector (MoCo v3 --moco-mlp-dim)
    pred_hidden_dim: int = bounded(AT_LEAST_1, 4096)  # hidden width of the 2-layer predictor (MoCo v3 --moco-mlp-dim)
    projector_dropout: float = bounded(RATE, 0.2)  # LoDisc's Dropout after each hidden layer of the projector
    predictor_dropout: float = bounded(RATE, 0.2)  # LoDisc's Dropout after the predictor's hidden layer


@dataclass
class BYOLConfig:
    """`method.byol`: BYOL's heads and EMA."""

    momentum: float = bounded(RATE, 0.99)  # EMA τ, cosine to 1 (the paper: 0.996 over 1000 epochs)
    proj_hidden_dim: int = bounded(AT_LEAST_1, 4096)  # hidden width of the projector (BYOL §3.3: 4096)
    out_dim: int = bounded(AT_LEAST_1, 256)  # width of the projection and prediction (BYOL §3.3: 256)
    pred_hidden_dim: int = bounded(AT_LEAST_1, 4096)  # hidden width of the predictor (BYOL §3.3: 4096)


@dataclass
class DINOConfig:
    """`method.dino`: DINO's head, temperatures and centre. Defaults: `main_dino.py`'s (DINO's plain ViT-S/16
    run); its README's boosted run sets teacher_temp 0.07, warmup_teacher_temp_epochs 30, norm_last_layer false
    (configs/pretrain/dino_vit_s16_cub_boosted.yaml, METHODS §6)."""

    momentum: float = bounded(RATE, 0.996)  # EMA m0, cosine to 1 (--momentum_teacher)
    hidden_dim: int = bounded(AT_LEAST_1, 2048)  # DINOHead's default
    bottleneck_dim: int = bounded(AT_LEAST_1, 256)  # DINOHead's default
    out_dim: int = bounded(AT_LEAST_1, 65536)  # K, the prototypes of the softmax (--out_dim)
    norm_last_layer: bool = True  # the weight-normalised last layer's norm fixed to 1 (--norm_last_layer)
    use_bn_in_head: bool = False  # batch norm after the head's hidden layers (--use_bn_in_head; DINO's ResNet runs)
    student_temp: float = bounded(POSITIVE, 0.1)  # DINOLoss's default
    teacher_temp: float = bounded(POSITIVE, 0.04)  # after the warm-up (--teacher_temp)
    warmup_teacher_temp: float = bounded(POSITIVE, 0.04)  # at epoch 0, linear to teacher_temp (--warmup_teacher_temp)
    warmup_teacher_temp_epochs: int = bounded(NON_NEGATIVE, 0)  # (--warmup_teacher_temp_epochs)
    center_momentum: float = bounded(RATE, 0.9)  # DINOLoss's default
    freeze_last_layer: int = bounded(NON_NEGATIVE, 1)  # epochs without training the last layer (--freeze_last_layer)


@dataclass
class SimCLRConfig:
    """`method.simclr`: SimCLR v1's projection head and NT-Xent (no teacher, METHODS §6)."""

    # τ of NT-Xent (SimCLR run.py --temperature, default 0.1 as its ImageNet runs; its CIFAR-10 runs set 0.5)
    temperature: float = bounded(POSITIVE, 0.1)
    proj_hidden_dim: int = bounded(AT_LEAST_1, 2048)  # hidden width of the head (SimCLR v1: 2048, ResNet-50's)
    out_dim: int = bounded(AT_LEAST_1, 128)  # width of the projection the loss compares (run.py --head_proj_dim 128)


@dataclass
class BarlowTwinsConfig:
    """`method.barlowtwins`: Barlow Twins' projector and loss (no teacher, METHODS §6)."""

    # λ, the weight of the off-diagonal (redundancy) terms (the paper: 5e-3; its main.py --lambd 0.0051)
    lambda_param: float = bounded(NON_NEGATIVE, 5e-3)
    proj_hidden_dim: int = bounded(AT_LEAST_1, 8192)  # hidden width of the 3-layer projector (--projector)
    out_dim: int = bounded(AT_LEAST_1, 8192)  # width of the embeddings C correlates (main.py --projector)


@dataclass
class VICRegConfig:
    """`method.vicreg`: VICReg's expander and loss coefficients (no teacher, METHODS §6)."""

    sim_coeff: float = bounded(NON_NEGATIVE, 25.0)  # λ, the invariance (MSE) term's weight (main_vicreg.py --sim-coeff)
    std_coeff: float = bounded(NON_NEGATIVE, 25.0)  # μ, the variance hinge's weight (--std-coeff)
    cov_coeff: float = bounded(NON_NEGATIVE, 1.0)  # ν, the covariance term's weight (--cov-coeff)
    eps: float = bounded(POSITIVE, 1e-4)  # added to the variance under the square root (main_vicreg.py: 0.0001)
    proj_hidden_dim: int = bounded(AT_LEAST_1, 8192)  # hidden width of the 3-layer expander (--mlp 8192-8192-8192)
    out_dim: int = bounded(AT_LEAST_1, 8192)  # width of the embeddings the loss reads (--mlp 8192-8192-8192)


# one section per method, as `sslfg.methods.METHODS` (a test checks that both name the same methods)
CONFIGS: dict[str, type] = {"mocov3": MoCoV3Config, "dino": DINOConfig, "byol": BYOLConfig, "simclr": SimCLRConfig,
                            "barlowtwins": BarlowTwinsConfig, "vicreg": VICRegConfig}


@dataclass
class MethodKeys:
    """The keys of `method` besides each method's own section (declared here for their meanings)."""

    name: str = "mocov3"  # the pretraining method, one of sslfg.methods.METHODS (METHODS §6)
    # LoDisc's local branch, for every method
    local: LocalConfig = dataclasses.field(default_factory=LocalConfig)
    # the teacher's EMA start as a half-life in optimizer steps, m0 = 2^(-1/h), replacing
    # method.<name>.momentum; a short run needs a short one or the teacher stays its random init; 0: off;
    # only for a method with a teacher (mocov3, byol, dino)
    teacher_half_life: float = bounded(NON_NEGATIVE, 0.0)


def _method_config() -> type:
    """The dataclass of `method`: `MethodKeys` (name, local, teacher_half_life), `name` one of the registered
    methods, and one section per registered method."""
    fields: list[tuple[str, Any, Any]] = [
        ("name", Literal[tuple(CONFIGS)], dataclasses.field(default="mocov3")),
        *((name, cls, dataclasses.field(default_factory=cls)) for name, cls in CONFIGS.items()),
    ]
    cls = dataclasses.make_dataclass("MethodConfig", fields, bases=(MethodKeys,))
    cls.__module__ = __name__
    cls.__doc__ = "`method`: which pretraining method (`name`), its local branch and each method's own keys."
    return cls


MethodConfig = _method_config()
