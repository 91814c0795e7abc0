"""MoCo v3 (METHODS §1): InfoNCE between the student's prediction of one view and the teacher's
projection of the other, keys gathered from every process. With the local branch on, this is LoDisc."""

from __future__ import annotations

from torch import Tensor, nn

from sslfg.losses import contrastive_loss
from sslfg.method_config import MoCoV3Config
from sslfg.methods.base import MomentumMethod
from sslfg.models.heads import mlp


class MoCoV3(MomentumMethod):
    """Heads as LoDisc builds them with MoCo v3's `_build_mlp`: projector 3 layers D→h→h→D, predictor
    `_build_mlp(2, D, h, D)` with its default last_bn=True; each ends with BatchNorm1d(affine=False),
    and each hidden layer is Linear → BN → ReLU → Dropout. Deliberate deviation: `use_projector: true`
    runs the projector, which the reference builds but never calls.

    Loss: ctr(q1, k2) + ctr(q2, k1) (`sslfg.losses.contrastive_loss`, × 2T as MoCo v3).
    """

    name = "mocov3"
    Config = MoCoV3Config

    def build_heads(self, dim: int) -> tuple[nn.Module, nn.Module]:
        c = self.cfg
        projector = (mlp(dim, c.proj_hidden_dim, dim, 3, last_bn=True, dropout=c.projector_dropout)
                     if c.use_projector else nn.Identity())
        return projector, mlp(dim, c.pred_hidden_dim, dim, 2, last_bn=True, dropout=c.predictor_dropout)

    def pair_loss(self, student: list[Tensor], teacher: list[Tensor]) -> Tensor:
        t = self.cfg.temperature
        return contrastive_loss(student[0], teacher[1], t) + contrastive_loss(student[1], teacher[0], t)
