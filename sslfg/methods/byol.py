"""BYOL (Grill et al. 2020; METHODS §6): the student's prediction of one view regresses the teacher's
projection of the other, 2 − 2·cos, symmetric; no negatives."""

from __future__ import annotations

from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor, nn

from sslfg.losses import byol_loss
from sslfg.method_config import BYOLConfig
from sslfg.methods.base import MomentumMethod
from sslfg.models.heads import global_batch_norm


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
