"""DINO (Caron et al. 2021; METHODS §6): self-distillation without labels. The student's softmax of one
view is trained towards the teacher's centred and sharpened softmax of the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.models.modules.center import center_mean
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from sslfg.config import AT_LEAST_1, NON_NEGATIVE, POSITIVE, RATE, bounded
from sslfg.methods.base import MomentumMethod

if TYPE_CHECKING:
    from sslfg.schema import ModelConfig


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
    student_temp: float = bounded(POSITIVE, 0.1)  # DINOLoss's default
    teacher_temp: float = bounded(POSITIVE, 0.04)  # after the warm-up (--teacher_temp)
    warmup_teacher_temp: float = bounded(POSITIVE, 0.04)  # at epoch 0, linear to teacher_temp (--warmup_teacher_temp)
    warmup_teacher_temp_epochs: int = bounded(NON_NEGATIVE, 0)  # (--warmup_teacher_temp_epochs)
    center_momentum: float = bounded(RATE, 0.9)  # DINOLoss's default


class DINOHead(nn.Module):
    """DINO's head: MLP D→h→h→bottleneck (GELU, no batch norm, as for ViTs), L2-normalised, then a
    weight-normalised linear layer to K outputs.

    Written here rather than taken from lightly: lightly 1.6's DINOProjectionHead uses the deprecated
    `torch.nn.utils.weight_norm`, which warns and whose module cannot be deep-copied into the teacher;
    this one uses `torch.nn.utils.parametrizations.weight_norm` (the same g·v/‖v‖ per output unit).
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # DINO's _init_weights
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def dino_cross_entropy(teacher: Tensor, student: Tensor, center: Tensor, teacher_temp: float,
                       student_temp: float) -> Tensor:
    """H(t, s) = −Σ_k softmax((t − c)/τ_t)_k · log softmax(s/τ_s)_k, mean over the batch (B, K) → ().

    Written here rather than with lightly's DINOLoss: its forward also moves the centre, which the local
    term (teacher on the masked view) must use without moving. float32 with autocast off: a softmax over
    65,536 prototypes at τ 0.04 in bf16 would lose the small probabilities.
    """
    with torch.autocast(student.device.type, enabled=False):
        target = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
        return -(target * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1).mean()


def teacher_temperatures(cfg: DINOConfig, total_steps: int, per_epoch: int) -> np.ndarray:
    """τ_t per step: DINO's per-epoch schedule, linear from warmup_teacher_temp at epoch 0 to teacher_temp
    at epoch warmup_teacher_temp_epochs − 1, then constant."""
    epoch = np.arange(total_steps) // per_epoch
    warm = cfg.warmup_teacher_temp_epochs
    ramp = cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * epoch / max(warm - 1, 1)
    return np.where(epoch < warm, ramp, cfg.teacher_temp)


class DINO(MomentumMethod):
    """Two global views; loss = (H(t2, s1) + H(t1, s2)) / 2 as DINO averages its pairs. The centre
    c ← m_c·c + (1 − m_c)·mean(teacher outputs) moves after every forward, the mean over the batch of
    every process (lightly's `center_mean` all-reduces it); it is a buffer, so checkpoints hold it."""

    name = "dino"
    Config = DINOConfig

    def __init__(self, model: ModelConfig, method: Any, image_size: int) -> None:
        super().__init__(model, method, image_size)
        self.register_buffer("center", torch.zeros(1, self.cfg.out_dim))
        self.teacher_temp = self.cfg.warmup_teacher_temp  # the pretraining loop sets each step's (set_step)

    def build_heads(self, dim: int) -> tuple[nn.Module, nn.Module]:
        c = self.cfg
        return DINOHead(dim, c.hidden_dim, c.bottleneck_dim, c.out_dim, c.norm_last_layer), nn.Identity()

    def schedules(self, total_steps: int, per_epoch: int) -> dict[str, np.ndarray]:
        return super().schedules(total_steps, per_epoch) | {
            "teacher_temp": teacher_temperatures(self.cfg, total_steps, per_epoch)}

    def set_step(self, values: dict[str, float]) -> None:
        self.teacher_temp = values["teacher_temp"]

    def pair_loss(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        def h(t: Tensor, s: Tensor) -> Tensor:
            return dino_cross_entropy(t, s, self.center, self.teacher_temp, self.cfg.student_temp)

        return (h(teacher[1], student[0]) + h(teacher[0], student[1])) / 2

    @torch.no_grad()
    def observe_teacher(self, teacher: list[Tensor]) -> None:
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(center_mean(torch.cat(teacher).float(), dim=(0,)), alpha=1 - m)
