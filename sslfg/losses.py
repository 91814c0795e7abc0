"""MoCo v3 InfoNCE with keys gathered from every process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from sslfg.distributed import rank_and_world


@torch.no_grad()
def gather_keys(k: Tensor) -> Tensor:
    """Concatenates (B, D) from all processes in rank order, (W·B, D); no gradient."""
    _, world = rank_and_world()
    if world == 1:
        return k
    out = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(out, k.contiguous())
    return torch.cat(out)


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """ctr(q, k) of METHODS §1: cross-entropy of q·Kᵀ/T against the matching key, × 2T.

    q (B, D) carries the gradient; k (B, D) is a target. Row i of this process matches column
    i + B·rank of the gathered keys.
    The logits are float32 with autocast off here: under bf16 autocast `q @ keys.T` would run in bf16
    (8 bits of mantissa on similarities divided by T = 0.2).
    """
    rank, _ = rank_and_world()
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        keys = gather_keys(F.normalize(k.float(), dim=1))
        logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)
