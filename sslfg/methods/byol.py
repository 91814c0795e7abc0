"""BYOL (Grill et al. 2020; METHODS §6): the student's prediction of one view regresses the teacher's
projection of the other, 2 − 2·cos, symmetric; no negatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor, nn

from sslfg.config import AT_LEAST_1, RATE, bounded
from sslfg.methods.base import MomentumMethod
from sslfg.models.heads import global_batch_norm


@dataclass
class BYOLConfig:
    """`method.byol`: BYOL's heads and EMA."""

    momentum: float = bounded(RATE, 0.99)  # EMA τ, cosine to 1 (the paper: 0.996 over 1000 epochs)
    proj_hidden_dim: int = bounded(AT_LEAST_1, 4096)
    out_dim: int = bounded(AT_LEAST_1, 256)
    pred_hidden_dim: int = bounded(AT_LEAST_1, 4096)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """2 − 2·cos(p, z), mean over the batch: ‖p̂ − ẑ‖² of the L2-normalised vectors (B, D) → ().

    Written here rather than with lightly's NegativeCosineSimilarity (−cos) to keep BYOL's form and to
    compute it in float32 with autocast off.
    """
    with torch.autocast(p.device.type, enabled=False):
        return 2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


class BYOL(MomentumMethod):
    """lightly's BYOL heads (projector D → h → out, predictor out → h → out: Linear, BatchNorm1d, ReLU,
    Linear), their batch norms over the batch of every process as BYOL's cross-replica batch norm.
    Loss: (2 − 2·cos(p1, z2)) + (2 − 2·cos(p2, z1)). Biases and norms get no weight decay, as in BYOL."""

    name = "byol"
    Config = BYOLConfig
    decay_biases_and_norms = False  # BYOL §3.3: biases and batch norm excluded from weight decay

    def build_heads(self, dim: int) -> tuple[nn.Module, nn.Module]:
        c = self.cfg
        return (global_batch_norm(BYOLProjectionHead(dim, c.proj_hidden_dim, c.out_dim)),
                global_batch_norm(BYOLPredictionHead(c.out_dim, c.pred_hidden_dim, c.out_dim)))

    def pair_loss(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        return byol_loss(student[0], teacher[1]) + byol_loss(student[1], teacher[0])
