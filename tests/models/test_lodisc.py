"""LoDisc pieces against formulas written out here (METHODS §1)."""

from __future__ import annotations

import math

import pytest
import torch

from sslfg.config import ConfigError
from sslfg.losses import contrastive_loss
from sslfg.models.backbone import cls_attention, forward_tokens
from sslfg.models.lodisc import LoDisc, keep_indices, location_score, num_kept, zero_fill
from sslfg.schema import ModelConfig
from tests.conftest import TINY_MODEL


def tiny_lodisc(**overrides: object) -> LoDisc:
    torch.manual_seed(0)
    no_dropout = {"projector_dropout": 0.0, "predictor_dropout": 0.0}  # so that a recomputation matches
    return LoDisc(ModelConfig(**{**TINY_MODEL, **no_dropout, **overrides}), image_size=16).train()


@pytest.mark.parametrize("n, ratio", [(196, 0.30), (49, 0.30), (16, 0.5), (100, 0.29), (10, 1.0)])
def test_keep_indices_match_product_of_attention_maps(n: int, ratio: float) -> None:
    torch.manual_seed(n)
    attn = torch.rand(4, 3, n).softmax(-1)  # (L, B, N)
    product = attn.prod(0)  # the reference: element-wise product over all layers
    k = math.floor(ratio * n + 1e-9)
    expected = product.topk(k, dim=1).indices.sort(dim=1).values
    got = keep_indices(attn, ratio)
    assert got.shape == (3, k) and torch.equal(got, expected)
    assert num_kept(196, 0.30) == 58


def test_location_score_survives_underflow() -> None:
    # 12 layers of attention around 1e-5: the product underflows to 0 in float32, the log-sum ranks.
    attn = torch.full((12, 1, 5), 1e-5)
    attn[:, 0, 3] = 2e-5
    assert attn.prod(0).max() == 0
    assert location_score(attn).argmax().item() == 3
    assert keep_indices(attn, 0.2).tolist() == [[3]]


def test_zero_fill_keeps_selected_patches_only() -> None:
    x = torch.randn(2, 3, 8, 8)
    keep = torch.tensor([[0, 3], [1, 2]])  # 2x2 grid of 4-pixel patches
    out = zero_fill(x, keep, patch_size=4)
    for b in range(2):
        for p in range(4):
            r, c = divmod(p, 2)
            patch = out[b, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4]
            ref = x[b, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] if p in keep[b] else torch.zeros_like(patch)
            assert torch.equal(patch, ref)


def test_cls_attention_equals_explicit_softmax_and_keeps_fused() -> None:
    vit = tiny_lodisc().encoder.eval()
    x = torch.randn(2, 3, 16, 16)
    vit.blocks[0].attn.fused_attn, vit.blocks[1].attn.fused_attn = True, False  # a mixed state, left as it is
    expected = forward_tokens(vit, x)
    with cls_attention(vit) as maps:
        assert [blk.attn.fused_attn for blk in vit.blocks] == [True, False]  # the blocks' own path runs
        out_attn = forward_tokens(vit, x)
    assert len(maps) == len(vit.blocks) and maps[0].shape == (2, 16) and maps[0].dtype == torch.float32
    torch.testing.assert_close(torch.stack(maps), explicit_cls_attention(vit, x), rtol=1e-5, atol=1e-6)
    # afterwards nothing is recorded any more, and the forward itself was not changed by the reading
    assert [blk.attn.fused_attn for blk in vit.blocks] == [True, False]
    assert all(not blk.attn.qkv._forward_hooks for blk in vit.blocks)
    assert torch.equal(out_attn, expected)
    forward_tokens(vit, x)
    assert len(maps) == len(vit.blocks)
    with cls_attention(vit) as bf16_maps, torch.autocast("cpu", torch.bfloat16):
        forward_tokens(vit, x)
    assert bf16_maps[0].dtype == torch.float32  # the CLS row is computed in float32 under autocast too
    torch.testing.assert_close(torch.stack(bf16_maps), torch.stack(maps), rtol=0, atol=0.02)


def test_drop_tokens_with_every_patch_equals_full_forward() -> None:
    vit = tiny_lodisc().encoder.eval()
    x = torch.randn(2, 3, 16, 16)
    all_idx = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(forward_tokens(vit, x, keep_idx=all_idx), forward_tokens(vit, x))
    keep = torch.tensor([[0, 5, 9], [2, 3, 15]])
    assert forward_tokens(vit, x, keep_idx=keep).shape == (2, 4, 32)


def reference_ctr(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """-1/B Σ_i log( exp(q̂_i·k̂_i/T) / Σ_j exp(q̂_i·k̂_j/T) ) × 2T, with plain loops."""
    qn = [qi / qi.norm() for qi in q.double()]
    kn = [ki / ki.norm() for ki in k.double()]
    total = 0.0
    for i, qi in enumerate(qn):
        logits = [float(qi @ kj) / t for kj in kn]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return torch.tensor(total / len(qn) * 2 * t, dtype=torch.float64)


def test_contrastive_loss_matches_formula() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(contrastive_loss(q, k, 0.2).double(), reference_ctr(q, k, 0.2), rtol=1e-5, atol=1e-6)


def explicit_cls_attention(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(L, B, N): each block's head-averaged CLS-to-patch softmax(q·kᵀ·scale), from its norm1 output."""
    inputs: list[torch.Tensor] = []
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


def reference_kept(vit: torch.nn.Module, x: torch.Tensor, keep_ratio: float) -> list[list[int]]:
    """The reference's mask_att_idex: product of the attention maps over layers; per sample keep the
    patches above the value at rank int(N·ratio) of the descending order."""
    product = explicit_cls_attention(vit, x).double().prod(0)
    kept = []
    for row in product:
        threshold = row.sort(descending=True).values[int(len(row) * keep_ratio)]
        kept.append([j for j in range(len(row)) if row[j] > threshold])
    return kept


def reference_zero_fill(x: torch.Tensor, kept: list[list[int]], patch: int) -> torch.Tensor:
    """Every patch not kept set to zero, one sample and one patch at a time."""
    out = x.clone()
    g = x.shape[-1] // patch
    for b, keep in enumerate(kept):
        for p in range(g * g):
            if p not in keep:
                r, c = divmod(p, g)
                out[b, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 0
    return out


def reference_drop_tokens_cls(vit: torch.nn.Module, x: torch.Tensor, kept: list[list[int]]) -> torch.Tensor:
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


def test_lodisc_loss_is_global_plus_weighted_local() -> None:
    model = tiny_lodisc(local_weight=0.7)
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    # Recompute every term as METHODS §1 writes it, the masks from the reference's formula.
    with torch.no_grad():
        q1 = model.predictor(model.projector(forward_tokens(model.encoder, x1)[:, 0]))
        q2 = model.predictor(model.projector(forward_tokens(model.encoder, x2)[:, 0]))
        enc, proj = model.momentum_encoder, model.momentum_projector
        k1, k2 = (proj(forward_tokens(enc, x)[:, 0]) for x in (x1, x2))
        kept1, kept2 = (reference_kept(enc, x, 0.30) for x in (x1, x2))
        km1, km2 = (proj(forward_tokens(enc, reference_zero_fill(x, kept, 4))[:, 0])
                    for x, kept in ((x1, kept1), (x2, kept2)))
    assert all(len(k) == 4 for k in kept1 + kept2)  # ⌊0.30·16⌋
    g = reference_ctr(q1, k2, 0.2) + reference_ctr(q2, k1, 0.2)
    loc = reference_ctr(q1, km2, 0.2) + reference_ctr(q2, km1, 0.2)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss_global"].double(), g, **tol)
    torch.testing.assert_close(out["loss_local"].double(), loc, **tol)
    torch.testing.assert_close(out["loss"].double(), g + 0.7 * loc, **tol)
    assert out["keep_idx"].tolist() == kept1 + kept2


def test_local_weight_zero_is_moco_v3() -> None:
    model = tiny_lodisc(local_weight=0.0)
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    assert set(out) == {"loss", "loss_global"} and torch.equal(out["loss"], out["loss_global"])
    with torch.no_grad():
        q1 = model.predictor(model.projector(forward_tokens(model.encoder, x1)[:, 0]))
        q2 = model.predictor(model.projector(forward_tokens(model.encoder, x2)[:, 0]))
        k1 = model.momentum_projector(forward_tokens(model.momentum_encoder, x1)[:, 0])
        k2 = model.momentum_projector(forward_tokens(model.momentum_encoder, x2)[:, 0])
    ref = reference_ctr(q1, k2, 0.2) + reference_ctr(q2, k1, 0.2)
    torch.testing.assert_close(out["loss"].double(), ref, rtol=1e-4, atol=1e-5)


def test_drop_tokens_local_view_uses_only_kept_tokens() -> None:
    model = tiny_lodisc(local_view="drop_tokens")
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    with torch.no_grad():
        q1 = model.predictor(model.projector(forward_tokens(model.encoder, x1)[:, 0]))
        q2 = model.predictor(model.projector(forward_tokens(model.encoder, x2)[:, 0]))
        enc, proj = model.momentum_encoder, model.momentum_projector
        km1, km2 = (proj(reference_drop_tokens_cls(enc, x, reference_kept(enc, x, 0.30))) for x in (x1, x2))
    ref = reference_ctr(q1, km2, 0.2) + reference_ctr(q2, km1, 0.2)
    torch.testing.assert_close(out["loss_local"].double(), ref, rtol=1e-4, atol=1e-5)


def test_gradients_reach_online_but_not_momentum_branch() -> None:
    model = tiny_lodisc()
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    model(x1, x2)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_parameters())


def test_ema_update_formula_and_predictor_untouched() -> None:
    model = tiny_lodisc()
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    before_m = [p.clone() for p in model.momentum_parameters()]
    online = [p.clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]]
    predictor = [p.clone() for p in model.predictor.parameters()]
    model.update_momentum(0.9)
    for pm, b, p in zip(model.momentum_parameters(), before_m, online, strict=True):
        torch.testing.assert_close(pm, 0.9 * b + 0.1 * p)
    assert all(torch.equal(a, b) for a, b in zip(model.predictor.parameters(), predictor, strict=True))


def layer_kinds(mlp: torch.nn.Module) -> list[str]:
    """e.g. ["Linear(32,64)", "BN", "ReLU", "Dropout(0.2)", ..., "BN-noaffine"]."""
    kinds = []
    for m in mlp:
        if isinstance(m, torch.nn.Linear):
            kinds.append(f"Linear({m.in_features},{m.out_features}{',bias' if m.bias is not None else ''})")
        elif isinstance(m, torch.nn.BatchNorm1d):
            kinds.append("BN" if m.affine else "BN-noaffine")
        elif isinstance(m, torch.nn.Dropout):
            kinds.append(f"Dropout({m.p})")
        else:
            kinds.append(type(m).__name__)
    return kinds


def test_projector_and_predictor_follow_lodisc_build_mlp() -> None:
    # LoDisc's _build_mlp (MoCo v3's plus Dropout(0.2)): projector _build_mlp(3, D, h, D), predictor
    # _build_mlp(2, D, h, D) with last_bn=True: both end in BatchNorm1d(affine=False).
    model = tiny_lodisc(projector_dropout=0.2, predictor_dropout=0.2)
    hidden = ["BN", "ReLU", "Dropout(0.2)"]
    assert layer_kinds(model.projector) == [
        "Linear(32,64)", *hidden, "Linear(64,64)", *hidden, "Linear(64,32)", "BN-noaffine"]
    assert layer_kinds(model.predictor) == ["Linear(32,64)", *hidden, "Linear(64,32)", "BN-noaffine"]
    assert layer_kinds(tiny_lodisc().predictor) == ["Linear(32,64)", "BN", "ReLU", "Linear(64,32)", "BN-noaffine"]
    assert isinstance(tiny_lodisc(use_projector=False).projector, torch.nn.Identity)
    # the final BN acts: in training, every output dimension has zero mean and unit variance over the batch
    q = model.predictor(torch.randn(16, 32) * 5 + 3)
    torch.testing.assert_close(q.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)


def test_attention_layers_ranks_by_the_last_blocks_only() -> None:
    x = torch.randn(3, 3, 16, 16)
    every, last = tiny_lodisc(keep_ratio=0.5), tiny_lodisc(keep_ratio=0.5, attention_layers=1)
    with torch.no_grad(), cls_attention(every.momentum_encoder) as maps:
        forward_tokens(every.momentum_encoder, x)
    assert torch.equal(every.kept_patches(x), keep_indices(torch.stack(maps), 0.5))
    assert torch.equal(last.kept_patches(x), maps[-1].topk(8, dim=1).indices.sort(dim=1).values)
    with pytest.raises(ConfigError, match="model.attention_layers"):
        tiny_lodisc(attention_layers=3)  # the tiny ViT has 2 blocks
