"""Barlow Twins (Zbontar et al. 2021; METHODS §6): the cross-correlation of the two views' batch-normalised
embeddings is pushed to the identity; no teacher, no negatives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightly.models.modules.heads import BarlowTwinsProjectionHead
from torch import Tensor, nn

from sslfg.losses import barlow_twins_loss
from sslfg.method_config import BarlowTwinsConfig
from sslfg.methods.siamese import SiameseMethod
from sslfg.models.heads import GlobalBatchNorm1d, global_batch_norm

if TYPE_CHECKING:
    from sslfg.schema import ModelConfig


class BarlowTwins(SiameseMethod):
    """lightly's Barlow Twins projector (D → h → h → out, BN and ReLU after the hidden layers), then the original's
    normalisation layer `bn` (BatchNorm1d without affine), every batch norm over the batch of every process as the
    original's SyncBatchNorm, so that C is the global batch's. Loss: `sslfg.losses.barlow_twins_loss`."""

    name = "barlowtwins"
    Config = BarlowTwinsConfig
    decay_biases_and_norms = False  # main.py's exclude_bias_and_norm

    def __init__(self, model: ModelConfig, method: Any, image_size: int) -> None:
        super().__init__(model, method, image_size)
        self.bn = GlobalBatchNorm1d(self.cfg.out_dim, affine=False, track_running_stats=False)

    def build_projector(self, dim: int) -> nn.Module:
        return global_batch_norm(BarlowTwinsProjectionHead(dim, self.cfg.proj_hidden_dim, self.cfg.out_dim))

    def view_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return barlow_twins_loss(self.bn(z1.float()), self.bn(z2.float()), self.cfg.lambda_param)
