"""LoDisc's local branch (METHODS §1 steps 3–6) against formulas written out here, and MoCo v3 + local =
LoDisc exactly as the reference computes it."""

from __future__ import annotations

import math

import pytest
import torch

from sslfg.config import ConfigError
from sslfg.methods.local import keep_indices, location_score, num_kept, zero_fill
from sslfg.models.backbone import cls_attention, forward_tokens
from tests.conftest import tiny_method
from tests.methods.references import explicit_cls_attention, outputs, reference_ctr

NO_DROPOUT = {"method.mocov3.projector_dropout": 0.0, "method.mocov3.predictor_dropout": 0.0}  # recomputable


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
    vit = tiny_method().encoder.eval()
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
    vit = tiny_method().encoder.eval()
    x = torch.randn(2, 3, 16, 16)
    all_idx = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(forward_tokens(vit, x, keep_idx=all_idx), forward_tokens(vit, x))
    keep = torch.tensor([[0, 5, 9], [2, 3, 15]])
    assert forward_tokens(vit, x, keep_idx=keep).shape == (2, 4, 32)


@pytest.mark.parametrize("view", ["zero_fill", "drop_tokens"])
def test_mocov3_with_local_branch_is_lodisc(view: str) -> None:
    """LoDisc: ctr(q1,k2) + ctr(q2,k1) + λ·(ctr(q1,km2) + ctr(q2,km1)), the kept patches and masked views
    from the reference's formulas; the forward returns the loss tensors only."""
    model = tiny_method(**NO_DROPOUT, **{"method.local.weight": 0.7, "method.local.view": view})
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    (q1, q2), (k1, k2), (km1, km2), kept = outputs(model, x1, x2, view)
    assert all(len(k) == 4 for k in kept)  # ⌊0.30·16⌋
    g = reference_ctr(q1, k2, 0.2) + reference_ctr(q2, k1, 0.2)
    loc = reference_ctr(q1, km2, 0.2) + reference_ctr(q2, km1, 0.2)
    tol = dict(rtol=1e-4, atol=1e-5)
    assert set(out) == {"loss", "loss_global", "loss_local"}
    torch.testing.assert_close(out["loss_global"].double(), g, **tol)
    torch.testing.assert_close(out["loss_local"].double(), loc, **tol)
    torch.testing.assert_close(out["loss"].double(), g + 0.7 * loc, **tol)
    assert model.kept_patches(torch.cat([x1, x2])).tolist() == kept


def test_attention_layers_ranks_by_the_last_blocks_only() -> None:
    x = torch.randn(3, 3, 16, 16)
    every = tiny_method(**{"method.local.keep_ratio": 0.5})
    last = tiny_method(**{"method.local.keep_ratio": 0.5, "method.local.attention_layers": 1})
    with torch.no_grad(), cls_attention(every.momentum_encoder) as maps:
        forward_tokens(every.momentum_encoder, x)
    assert torch.equal(every.kept_patches(x), keep_indices(torch.stack(maps), 0.5))
    assert torch.equal(last.kept_patches(x), maps[-1].topk(8, dim=1).indices.sort(dim=1).values)
    with pytest.raises(ConfigError, match="method.local.attention_layers"):
        tiny_method(**{"method.local.attention_layers": 3})  # the tiny ViT has 2 blocks
