"""Reference computations the method tests compare with, written out plainly: the CLS attention from the
blocks' weights, LoDisc's kept patches (product of the maps, threshold at rank ⌊N·ratio⌋) and masked views."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sslfg.methods import MomentumMethod
from sslfg.models.backbone import forward_tokens


def explicit_cls_attention(vit: nn.Module, x: Tensor) -> Tensor:
    """(L, B, N): each block's head-averaged CLS-to-patch softmax(q·kᵀ·scale), from its norm1 output."""
    inputs: list[Tensor] = []
    handles = [blk.norm1.register_forward_hook(lambda m, i, o: inputs.append(o)) for blk in vit.blocks]
    forward_tokens(vit, x)
    for h in handles:
        h.remove()
    maps = []
    for blk, h in zip(vit.blocks, inputs, strict=True):
        b, n, d = h.shape
        heads = blk.attn.num_heads
        q, k, _ = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).unbind(2)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) * (d // heads) ** -0.5
        maps.append(logits.softmax(-1)[:, :, 0, 1:].mean(1))
    return torch.stack(maps)


def reference_kept(vit: nn.Module, x: Tensor, keep_ratio: float) -> list[list[int]]:
    """The reference's mask_att_idex: product of the attention maps over layers; per sample keep the
    patches above the value at rank int(N·ratio) of the descending order."""
    product = explicit_cls_attention(vit, x).double().prod(0)
    kept = []
    for row in product:
        threshold = row.sort(descending=True).values[int(len(row) * keep_ratio)]
        kept.append([j for j in range(len(row)) if row[j] > threshold])
    return kept


def reference_zero_fill(x: Tensor, kept: list[list[int]], patch: int) -> Tensor:
    """Every patch not kept set to zero, one sample and one patch at a time."""
    out = x.clone()
    g = x.shape[-1] // patch
    for b, keep in enumerate(kept):
        for p in range(g * g):
            if p not in keep:
                r, c = divmod(p, g)
                out[b, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 0
    return out


def reference_drop_tokens_cls(vit: nn.Module, x: Tensor, kept: list[list[int]]) -> Tensor:
    """CLS after the final norm when only the kept patch tokens (with their position embeddings) enter the blocks."""
    patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    cls = vit.cls_token + vit.pos_embed[:, :1]
    out = []
    for b, keep in enumerate(kept):
        tokens = torch.cat([cls[0], patches[b, keep]])[None]
        for blk in vit.blocks:
            tokens = blk(tokens)
        out.append(vit.norm(tokens)[0, 0])
    return torch.stack(out)


@torch.no_grad()
def outputs(method: MomentumMethod, x1: Tensor, x2: Tensor, view: str = "zero_fill", keep_ratio: float = 0.30
            ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[list[int]]]:
    """Student outputs s1, s2, teacher outputs t1, t2, teacher outputs tm1, tm2 of the explicitly masked
    views (kept patches from the reference's formula), each view on its own, and the kept patches."""
    enc, head = method.momentum_encoder, method.momentum_projector
    s = [method.predictor(method.projector(forward_tokens(method.encoder, x)[:, 0])) for x in (x1, x2)]
    t = [head(forward_tokens(enc, x)[:, 0]) for x in (x1, x2)]
    kept = [reference_kept(enc, x, keep_ratio) for x in (x1, x2)]
    if view == "zero_fill":
        tm = [head(forward_tokens(enc, reference_zero_fill(x, k, method.patch_size))[:, 0]) for x, k in zip(
            (x1, x2), kept, strict=True)]
    else:
        tm = [head(reference_drop_tokens_cls(enc, x, k)) for x, k in zip((x1, x2), kept, strict=True)]
    return s, t, tm, kept[0] + kept[1]


def reference_ctr(q: Tensor, k: Tensor, t: float) -> Tensor:
    """MoCo v3's ctr: -1/B Σ_i log( exp(q̂_i·k̂_i/T) / Σ_j exp(q̂_i·k̂_j/T) ) × 2T, with plain loops."""
    qn = [qi / qi.norm() for qi in q.double()]
    kn = [ki / ki.norm() for ki in k.double()]
    total = 0.0
    for i, qi in enumerate(qn):
        logits = [float(qi @ kj) / t for kj in kn]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return torch.tensor(total / len(qn) * 2 * t, dtype=torch.float64)
