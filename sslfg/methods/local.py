"""LoDisc's location-wise masked local discrimination as a branch any method can switch on (METHODS §1, steps
3–6, §6).

The CLS attention of the method's `attention_encoder` (the teacher's; without a teacher, the encoder's own,
without gradient) ranks the patches (location score), the top ⌊keep_ratio·N⌋ are kept, the method embeds the
other view with only those patches (`zero_fill` or `drop_tokens`; the teacher without gradient, a method without
a teacher its own encoder and projector with it), and the method's own pair loss is taken between its output on
one view and the output on the masked other view, weighted by `method.local.weight`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sslfg.config import ConfigError
from sslfg.method_config import LocalConfig
from sslfg.models.backbone import forward_tokens

if TYPE_CHECKING:
    from sslfg.methods.base import Method


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


class LocalBranch:
    """Kept patches from the attention, the masked view, and the local term of the loss.

    No parameters of its own: the encoders and heads, and the pair loss, are the method's.
    """

    def __init__(self, cfg: LocalConfig, patch_size: int, depth: int) -> None:
        if not 0 <= cfg.attention_layers <= depth:
            raise ConfigError(f"method.local.attention_layers: expected 0 (every block) to {depth}, "
                              f"got {cfg.attention_layers}")
        self.cfg = cfg
        self.patch_size = patch_size

    @property
    def on(self) -> bool:
        return self.cfg.weight != 0

    def keep(self, maps: list[Tensor]) -> Tensor:
        """The kept patches (B, K), ascending, from every block's CLS attention [(B, N)] × L."""
        maps = maps[-self.cfg.attention_layers :] if self.cfg.attention_layers else maps
        return keep_indices(torch.stack(maps), self.cfg.keep_ratio)

    def masked_cls(self, encoder: nn.Module, x: Tensor, keep_idx: Tensor) -> Tensor:
        """`encoder`'s CLS (B, D) of images x with only the patches keep_idx (B, K) left."""
        if self.cfg.view == "zero_fill":
            return forward_tokens(encoder, zero_fill(x, keep_idx, self.patch_size))[:, 0]
        return forward_tokens(encoder, x, keep_idx=keep_idx)[:, 0]

    def loss(self, method: Method, outputs: list[Tensor], x: Tensor, keep_idx: Tensor) -> Tensor:
        """The method's pair loss between its outputs [o1, o2] and its `masked_outputs` of the masked views of
        x = cat(x1, x2) (2B, ...), whose kept patches are keep_idx (2B, K)."""
        return method.pair_loss(outputs, method.masked_outputs(x, keep_idx))
