"""DINO (Caron et al. 2021; METHODS §6): self-distillation without labels. The student's softmax of one
view is trained towards the teacher's centred and sharpened softmax of the other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from lightly.models.modules.center import center_mean
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from sslfg.losses import dino_cross_entropy
from sslfg.method_config import DINOConfig
from sslfg.methods.base import MomentumMethod
from sslfg.models.heads import GlobalBatchNorm1d

if TYPE_CHECKING:
    from sslfg.schema import ModelConfig


class DINOHead(nn.Module):
    """DINO's head: MLP D→h→h→bottleneck (GELU; batch norm after each hidden Linear only with `use_bn`, which DINO
    sets for ResNets, synchronised over processes as its SyncBatchNorm), L2-normalised, then a weight-normalised
    linear layer to K outputs.

    Written here rather than taken from lightly: lightly 1.6's DINOProjectionHead uses the deprecated
    `torch.nn.utils.weight_norm`, which warns and whose module cannot be deep-copied into the teacher;
    this one uses `torch.nn.utils.parametrizations.weight_norm` (the same g·v/‖v‖ per output unit).
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, norm_last_layer: bool,
                 use_bn: bool = False) -> None:
        super().__init__()
        hidden = [[nn.Linear(d, hidden_dim), *([GlobalBatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
                  for d in (in_dim, hidden_dim)]
        self.mlp = nn.Sequential(*hidden[0], *hidden[1], nn.Linear(hidden_dim, bottleneck_dim))
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


def teacher_temperatures(cfg: DINOConfig, total_steps: int, per_epoch: int) -> np.ndarray:
    """τ_t per step: DINO's per-epoch schedule, linear from warmup_teacher_temp at epoch 0 to teacher_temp
    at epoch warmup_teacher_temp_epochs − 1, then constant."""
    epoch = np.arange(total_steps) // per_epoch
    warm = cfg.warmup_teacher_temp_epochs
    ramp = cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * epoch / max(warm - 1, 1)
    return np.where(epoch < warm, ramp, cfg.teacher_temp)


class DINO(MomentumMethod):
    """Two global views and any local ones (multi-crop); loss = the mean of H(tᵢ, sᵥ) over the teacher's global
    views i and the student's views v ≠ i, as DINOLoss ((H(t2, s1) + H(t1, s2)) / 2 for two views). The centre
    c ← m_c·c + (1 − m_c)·mean(teacher outputs) moves once per optimizer step, the mean over the batch of every
    process (lightly's `center_mean` all-reduces it) and of every micro-batch of the step, so that accumulation
    equals the larger batch; it is a buffer, so checkpoints hold it. As in DINO's code, biases and norms get no
    weight decay and the head's last layer does not train during the first `freeze_last_layer` epochs."""

    name = "dino"
    Config = DINOConfig
    decay_biases_and_norms = False
    multi_crop = True
    joint_heads = True  # MultiCropWrapper: one head pass on every crop (its batch norm, if any, sees them all)

    def __init__(self, model: ModelConfig, method: Any, image_size: int) -> None:
        super().__init__(model, method, image_size)
        self.register_buffer("center", torch.zeros(1, self.cfg.out_dim))
        self.teacher_temp = self.cfg.warmup_teacher_temp  # the pretraining loop sets each step's (set_step)
        self.batch_centers: list[Tensor] = []  # this optimizer step's, one per forward

    def build_heads(self, dim: int) -> tuple[nn.Module, nn.Module]:
        c = self.cfg
        head = DINOHead(dim, c.hidden_dim, c.bottleneck_dim, c.out_dim, c.norm_last_layer, c.use_bn_in_head)
        return head, nn.Identity()

    def schedules(self, total_steps: int, per_epoch: int) -> dict[str, np.ndarray]:
        return super().schedules(total_steps, per_epoch) | {
            "teacher_temp": teacher_temperatures(self.cfg, total_steps, per_epoch)}

    def set_step(self, values: dict[str, float]) -> None:
        self.teacher_temp = values["teacher_temp"]

    def frozen_epochs(self) -> dict[str, int]:
        return {"projector.last_layer.": self.cfg.freeze_last_layer}  # DINO's cancel_gradients_last_layer

    def pair_loss(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        """DINOLoss: the mean of H(tᵢ, sᵥ) over both teacher (global) views i and every student view v ≠ i."""
        terms = [dino_cross_entropy(t, s, self.center, self.teacher_temp, self.cfg.student_temp)
                 for i, t in enumerate(teacher) for v, s in enumerate(student) if v != i]
        return sum(terms) / len(terms)

    @torch.no_grad()
    def observe_teacher(self, teacher: list[Tensor]) -> None:
        self.batch_centers.append(center_mean(torch.cat(teacher).float(), dim=(0,)))

    @torch.no_grad()
    def after_update(self, values: dict[str, float], applied: bool) -> None:
        """The EMA after an applied step; the centre after every step, as DINO's moves in each forward."""
        super().after_update(values, applied)
        if self.batch_centers:
            m, batch = self.cfg.center_momentum, self.batch_centers
            self.center.mul_(m).add_(batch[0] if len(batch) == 1 else torch.stack(batch).mean(0), alpha=1 - m)
            self.batch_centers = []
