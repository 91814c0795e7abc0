"""LoDisc: MoCo v3 global contrast plus location-wise masked local discrimination (METHODS §1)."""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from lightly.models.utils import update_momentum
from torch import Tensor, nn

from sslfg.config import ConfigError
from sslfg.losses import contrastive_loss
from sslfg.models.backbone import cls_attention, create_vit, forward_tokens, grid_size, timm_kwargs
from sslfg.models.heads import mlp
from sslfg.schema import ModelConfig


def location_score(cls_attn: Tensor) -> Tensor:
    """s = Σ_l log a_l, (B, N), from per-block CLS-to-patch attention (L, B, N).

    Ranks patches like the reference's element-wise product of all layers' maps, without the
    underflow that product suffers in low precision.
    """
    return cls_attn.float().clamp_min(torch.finfo(torch.float32).tiny).log().sum(0)


def num_kept(num_patches: int, keep_ratio: float) -> int:
    """⌊keep_ratio·N⌋ (at least one patch); the epsilon guards 0.29·100 = 28.999…"""
    return max(1, math.floor(keep_ratio * num_patches + 1e-9))


def keep_indices(cls_attn: Tensor, keep_ratio: float) -> Tensor:
    """Indices of the ⌊keep_ratio·N⌋ patches with the highest location score, (B, K), ascending."""
    score = location_score(cls_attn)
    k = num_kept(score.shape[1], keep_ratio)
    return score.topk(k, dim=1).indices.sort(dim=1).values


def zero_fill(images: Tensor, keep_idx: Tensor, patch_size: int) -> Tensor:
    """Images (B, C, H, W) with every patch not in keep_idx set to zero (the mean colour)."""
    b, c, h, w = images.shape
    g = h // patch_size
    keep = torch.zeros(b, g * g, dtype=images.dtype, device=images.device)
    keep.scatter_(1, keep_idx, 1.0)
    keep = keep.view(b, 1, g, 1, g, 1)
    return (images.view(b, c, g, patch_size, g, patch_size) * keep).view(b, c, h, w)


class LoDisc(nn.Module):
    """Online encoder + projector + predictor, and their momentum twins (no predictor).

    Heads as LoDisc builds them with MoCo v3's `_build_mlp`: projector 3 layers D→h→h→D, predictor
    `_build_mlp(2, D, h, D)` with its default last_bn=True; each ends with BatchNorm1d(affine=False),
    and each hidden layer is Linear → BN → ReLU → Dropout (`projector_dropout`, `predictor_dropout`,
    0.2 in LoDisc; 0 gives MoCo v3's heads). Deliberate deviation: `use_projector: true` runs the
    projector, which the reference builds but never calls (`false` reproduces the reference code).

    forward(x1, x2) returns the loss and its parts; `local_weight == 0` skips the local branch
    entirely, which is MoCo v3.
    """

    def __init__(self, cfg: ModelConfig, image_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.timm_kwargs = timm_kwargs(image_size, cfg.patch_size, cfg.kwargs)
        self.encoder = create_vit(cfg.name, self.timm_kwargs, cfg.weights, cfg.drop_path_rate,
                                  pretrained=cfg.pretrained)
        dim = self.encoder.embed_dim
        if not 0 <= cfg.attention_layers <= len(self.encoder.blocks):
            raise ConfigError(f"model.attention_layers: expected 0 (every block) to {len(self.encoder.blocks)}, "
                              f"got {cfg.attention_layers}")
        self.patch_size = image_size // grid_size(self.encoder)
        self.projector = (mlp(dim, cfg.proj_hidden_dim, dim, 3, last_bn=True, dropout=cfg.projector_dropout)
                          if cfg.use_projector else nn.Identity())
        self.predictor = mlp(dim, cfg.pred_hidden_dim, dim, 2, last_bn=True, dropout=cfg.predictor_dropout)
        self.momentum_encoder = copy.deepcopy(self.encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """p_m ← m·p_m + (1−m)·p for encoder and projector (never the predictor)."""
        update_momentum(self.encoder, self.momentum_encoder, m)
        update_momentum(self.projector, self.momentum_projector, m)

    def _queries(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        # One encoder pass over both views (LayerNorm is per token, so this equals two passes);
        # the heads run per view so their batch norm sees one view, as in MoCo v3.
        cls = forward_tokens(self.encoder, torch.cat([x1, x2]))[:, 0].chunk(2)
        return self.predictor(self.projector(cls[0])), self.predictor(self.projector(cls[1]))

    @torch.no_grad()
    def _momentum_cls(self, x: Tensor, with_keep: bool) -> tuple[Tensor, Tensor | None]:
        """Momentum CLS (B, D) and, from the same pass, the kept patches (B, K) if asked."""
        with cls_attention(self.momentum_encoder) if with_keep else contextlib.nullcontext([]) as maps:
            cls = forward_tokens(self.momentum_encoder, x)[:, 0]
        maps = maps[-self.cfg.attention_layers :] if self.cfg.attention_layers else maps
        return cls, keep_indices(torch.stack(maps), self.cfg.keep_ratio) if with_keep else None

    def kept_patches(self, x: Tensor) -> Tensor:
        """The patches the local branch keeps for images x, (B, K) ascending."""
        return self._momentum_cls(x, with_keep=True)[1]

    @torch.no_grad()
    def _keys(self, x1: Tensor, x2: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Momentum keys of both views and, if the local branch is on, their kept patches (2B, K)."""
        cls, keep_idx = self._momentum_cls(torch.cat([x1, x2]), with_keep=self.cfg.local_weight != 0)
        return [self.momentum_projector(c) for c in cls.chunk(2)], keep_idx

    @torch.no_grad()
    def _local_keys(self, x1: Tensor, x2: Tensor, keep_idx: Tensor) -> list[Tensor]:
        x = torch.cat([x1, x2])
        if self.cfg.local_view == "zero_fill":
            cls = forward_tokens(self.momentum_encoder, zero_fill(x, keep_idx, self.patch_size))[:, 0]
        else:
            cls = forward_tokens(self.momentum_encoder, x, keep_idx=keep_idx)[:, 0]
        return [self.momentum_projector(c) for c in cls.chunk(2)]

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        """x1, x2 (B, 3, H, W) two views → {"loss", "loss_global", "loss_local", "keep_idx"}."""
        t = self.cfg.temperature
        q1, q2 = self._queries(x1, x2)
        (k1, k2), keep_idx = self._keys(x1, x2)
        loss_global = contrastive_loss(q1, k2, t) + contrastive_loss(q2, k1, t)
        out = {"loss_global": loss_global, "loss": loss_global}
        if keep_idx is not None:
            km1, km2 = self._local_keys(x1, x2, keep_idx)
            loss_local = contrastive_loss(q1, km2, t) + contrastive_loss(q2, km1, t)
            out.update(loss_local=loss_local, loss=loss_global + self.cfg.local_weight * loss_local, keep_idx=keep_idx)
        return out
