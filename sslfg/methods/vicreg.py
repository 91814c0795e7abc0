"""VICReg (Bardes et al. 2022; METHODS §6): invariance, variance and covariance terms on the two views'
embeddings; no teacher, no negatives."""

from __future__ import annotations

from lightly.models.modules.heads import VICRegProjectionHead
from torch import Tensor, nn

from sslfg.losses import vicreg_loss
from sslfg.method_config import VICRegConfig
from sslfg.methods.siamese import SiameseMethod
from sslfg.models.heads import global_batch_norm


class VICReg(SiameseMethod):
    """lightly's VICReg expander (D → h → h → out, BN and ReLU after the hidden layers), its batch norms over the
    batch of every process as the original's SyncBatchNorm. Loss: `sslfg.losses.vicreg_loss`."""

    name = "vicreg"
    Config = VICRegConfig
    decay_biases_and_norms = False  # main_vicreg.py's exclude_bias_and_norm

    def build_projector(self, dim: int) -> nn.Module:
        return global_batch_norm(VICRegProjectionHead(dim, self.cfg.proj_hidden_dim, self.cfg.out_dim))

    def view_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        c = self.cfg
        return vicreg_loss(z1, z2, c.sim_coeff, c.std_coeff, c.cov_coeff, c.eps)
