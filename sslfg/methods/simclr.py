"""SimCLR (Chen et al. 2020; METHODS §6): NT-Xent between the projections of two views, the other images' views
of every process as negatives; no teacher."""

from __future__ import annotations

from lightly.models.modules.heads import SimCLRProjectionHead
from torch import Tensor, nn

from sslfg.losses import nt_xent_loss
from sslfg.method_config import SimCLRConfig
from sslfg.methods.siamese import SiameseMethod
from sslfg.models.heads import global_batch_norm


class SimCLR(SiameseMethod):
    """lightly's SimCLR v1 projection head (Linear → BN → ReLU → Linear → BN, D → h → out), its batch norms over the
    batch of every process as SimCLR's global batch norm. Loss: NT-Xent at method.simclr.temperature."""

    name = "simclr"
    Config = SimCLRConfig
    decay_biases_and_norms = False  # SimCLR's code (its LARS) excludes batch norm and biases from weight decay

    def build_projector(self, dim: int) -> nn.Module:
        return global_batch_norm(SimCLRProjectionHead(dim, self.cfg.proj_hidden_dim, self.cfg.out_dim))

    def view_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent_loss(z1, z2, self.cfg.temperature)
