"""ILA adapters against formulas written out here (METHODS §3)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from sslfg.models.backbone import forward_tokens, timm_kwargs
from sslfg.models.ila import InterLayerAdapter, attach_ila, count_parameters, final_grid
from sslfg.weights import create_vit


def narrow_vit(img_size: int, patch_size: int, depth: int, seed: int = 0) -> torch.nn.Module:
    """A ViT of the given geometry but only 48 wide (3 heads): cheap on CPU."""
    torch.manual_seed(seed)
    extra = {"embed_dim": 48, "depth": depth, "num_heads": 3}
    return create_vit("vit_tiny_patch16_224", timm_kwargs(img_size, patch_size, extra))


def block_token_counts(vit: torch.nn.Module, img_size: int) -> list[int]:
    """Token count after each transformer block, read by forward hooks."""
    counts: list[int] = []
    blocks = [m for m in vit.blocks if isinstance(m, Block)]
    handles = [b.register_forward_hook(lambda _m, _i, out: counts.append(out.shape[1])) for b in blocks]
    with torch.no_grad():
        out = forward_tokens(vit.eval(), torch.randn(1, 3, img_size, img_size))
    for h in handles:
        h.remove()
    assert out.shape[1] == counts[-1]
    return counts


def test_token_counts_vit_b16_geometry() -> None:
    vit = attach_ila(narrow_vit(224, 16, depth=12), "ila")
    assert block_token_counts(vit, 224) == [197] * 4 + [145] * 4 + [101] * 4
    assert final_grid(vit) == 10


@pytest.mark.parametrize("variant", ["ila", "ila++"])
@pytest.mark.parametrize("positions", [None, [0, 2, 4]])
def test_token_counts_follow_g_minus_2k(variant: str, positions: list[int] | None) -> None:
    g, depth = 8, 6  # 64/8; default positions after blocks 1 and 3
    vit = attach_ila(narrow_vit(64, 8, depth), variant, positions=positions)
    where = positions or [1, 3]
    expected = [(g - 2 * sum(p < i for p in where)) ** 2 + 1 for i in range(depth)]
    assert block_token_counts(vit, 64) == expected
    assert expected == ([65, 65, 37, 37, 17, 17] if positions is None else [65, 37, 37, 17, 17, 5])
    assert final_grid(vit) == g - 2 * len(where)


def neighbourhood_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out[b, i, j, d] = Σ_{u,v<3} weight[d, u, v] · x[b, i+u, j+v, d] for a (B, G, G, D) grid, by loops."""
    g = x.shape[1]
    out = torch.zeros(x.shape[0], g - 2, g - 2, x.shape[3], dtype=x.dtype)
    for i in range(g - 2):
        for j in range(g - 2):
            for u in range(3):
                for v in range(3):
                    out[:, i, j] += weight[:, u, v] * x[:, i + u, j + v]
    return out


def test_residual_branch_sums_each_neighbourhood_at_init() -> None:
    torch.manual_seed(0)
    d, g = 48, 6
    adapter = InterLayerAdapter(d, width=8)
    weight = adapter.reduce.weight.detach()[:, 0]  # (D, 3, 3)
    assert weight.shape == (d, 3, 3) and adapter.reduce.bias is None
    assert (weight - 1).abs().max() < 0.005 and 0.0005 < (weight - 1).std() < 0.002
    x = torch.randn(2, 1 + g * g, d)
    out = adapter.shortcut(x)
    grid = x[:, 1:].reshape(2, g, g, d)
    assert out.shape == (2, 1 + (g - 2) ** 2, d)
    assert torch.equal(out[:, 0], x[:, 0])  # CLS passes unchanged
    exact = neighbourhood_sums(grid, weight).reshape(2, -1, d)
    torch.testing.assert_close(out[:, 1:], exact, atol=1e-5, rtol=1e-5)
    plain_sum = neighbourhood_sums(grid, torch.ones(d, 3, 3)).reshape(2, -1, d)
    torch.testing.assert_close(out[:, 1:], plain_sum, atol=9 * 0.005 * float(x.abs().max()), rtol=0)


def batch_norm(x: torch.Tensor, bn: torch.nn.Module, dims: tuple[int, ...]) -> torch.Tensor:
    """Training-mode batch norm by its formula; `x` has channels last, statistics over `dims`."""
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias


def reference_bottleneck(adapter: InterLayerAdapter, x: torch.Tensor) -> torch.Tensor:
    """METHODS §3's bottleneck written out: BN over (batch, tokens) for tokens, over (batch, rows, cols) for the map."""
    b, n, _ = x.shape
    g = round((n - 1) ** 0.5)
    h = F.gelu(batch_norm(x @ adapter.down.weight.T, adapter.norm_down, (0, 1)))
    r = h.shape[-1]
    grid = h[:, 1:].reshape(b, g, g, r)
    if not adapter.downsample:
        grid = F.pad(grid, (0, 0, 1, 1, 1, 1))
    k = adapter.conv_dw.weight[:, 0]  # (r, 3, 3): one 3×3 filter per channel
    side = grid.shape[1] - 2
    dw = sum(k[:, u, v] * grid[:, u : u + side, v : v + side] for u in range(3) for v in range(3))
    dw = F.gelu(batch_norm(dw, adapter.norm_dw, (0, 1, 2)))
    pw = dw @ adapter.conv_pw.weight[:, :, 0, 0].T + adapter.conv_pw.bias
    cls = h[:, :1] @ adapter.cls_proj.weight.T + adapter.cls_proj.bias
    h = torch.cat([cls, pw.reshape(b, -1, r)], dim=1)
    return F.gelu(batch_norm(h, adapter.norm_up, (0, 1))) @ adapter.up.weight.T + adapter.up.bias


@pytest.mark.parametrize("downsample", [True, False])
def test_adapter_matches_the_written_out_formula(downsample: bool) -> None:
    torch.manual_seed(0)
    d, g = 48, 5
    adapter = InterLayerAdapter(d, width=8, downsample=downsample, dropout=0.0).train()
    with torch.no_grad():  # non-trivial affine BN parameters, so that their placement matters
        for bn in (adapter.norm_down, adapter.norm_dw, adapter.norm_up):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    x = torch.randn(3, 1 + g * g, d)
    g_out = g - 2 if downsample else g
    bottleneck = adapter.bottleneck(x)
    assert bottleneck.shape == (3, 1 + g_out**2, d)
    torch.testing.assert_close(bottleneck, reference_bottleneck(adapter, x), atol=1e-5, rtol=1e-4)
    residual = adapter.shortcut(x) if downsample else x  # ILA+ adapters: x + adapter(x)
    torch.testing.assert_close(adapter(x), residual + reference_bottleneck(adapter, x), atol=1e-5, rtol=1e-4)


def test_dropout_acts_on_the_bottleneck_only() -> None:
    torch.manual_seed(0)
    adapter = InterLayerAdapter(48, width=8, dropout=1.0).train()  # dropout 1: only the residual is left
    x = torch.randn(2, 1 + 25, 48)
    torch.testing.assert_close(adapter(x), adapter.shortcut(x))


@pytest.mark.parametrize("variant", ["ila", "ila+", "ila++"])
def test_only_adapters_and_cls_token_train(variant: str) -> None:
    vit = narrow_vit(24, 4, depth=3)  # G = 6 → 4 → 2
    original = {name: p.detach().clone() for name, p in vit.named_parameters() if name != "cls_token"}
    original_ids = {id(p) for p in vit.parameters()}
    attach_ila(vit, variant)
    trainable = [p for p in vit.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} & original_ids == {id(vit.cls_token)}
    head = torch.nn.Linear(48, 3)
    opt = torch.optim.SGD(trainable + list(head.parameters()), lr=0.1)
    assert all(p.requires_grad for group in opt.param_groups for p in group["params"])
    adapter_start = {name: p.detach().clone() for name, p in vit.named_parameters() if p.requires_grad}
    x, y = torch.randn(8, 3, 24, 24), torch.arange(8) % 3
    vit.train()
    for _ in range(3):  # ila++'s zero-initialised up projections make its down projections move from step 2
        opt.zero_grad()
        F.cross_entropy(head(forward_tokens(vit, x)[:, 0]), y).backward()
        opt.step()
    frozen = {n: p for n, p in vit.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(original)
    # attaching renames the blocks (adapters interleave, ila++ wraps attn/mlp): match frozen tensors in order
    for (name, before), after in zip(original.items(), frozen.values(), strict=True):
        assert torch.equal(before, after), name
    for name, p in vit.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapter_start[name]), f"{name} did not move"


def inter_layer_params(d: int, r: int, downsample: bool) -> int:
    """down D·r (no bias: BN follows), BN 2r, depthwise 9r (no bias), BN 2r, pointwise r²+r, CLS r²+r, BN 2r,
    up r·D+D, and the down-sampling residual 9D (no bias)."""
    residual = 9 * d if downsample else 0
    return d * r + 2 * r + 9 * r + 2 * r + (r * r + r) + (r * r + r) + 2 * r + (r * d + d) + residual


def reference_iladapter_params(d: int, r: int, downsample: bool) -> int:
    """The reference's ILAdapter (adapters.py, groups 1, BN norms, cls_conv): adapter_down D·r+r, norm1 2r,
    adapter_conv (depthwise 9r+r, BN 2r, 1×1 r²+r), adapter_cls r²+r, norm3 2r, adapter_up r·D+D, ds_conv 9D."""
    residual = 9 * d if downsample else 0
    return (d * r + r) + 2 * r + (9 * r + r) + 2 * r + (r * r + r) + (r * r + r) + 2 * r + (r * d + d) + residual


def vit_b16_trainable(variant: str) -> int:
    """Trainable parameters of `variant` on the ViT-B/16 224 geometry, CLS token aside (meta tensors: no memory)."""
    with torch.device("meta"):
        vit = attach_ila(timm.create_model("vit_base_patch16_224", num_classes=0), variant)
    return count_parameters(vit)[0] - vit.cls_token.numel()


def test_vit_b16_counts_are_the_reference_counts() -> None:
    # METHODS §3 / the reference README: ILA 2 down-sampling adapters; ILA+ also 10 plain ones; ILA++ the 2
    # down-sampling adapters and 24 parallel Linear(768→8) → GELU → Linear(8→768) (13,064 each), no ILA+.
    d, r = 768, 8
    ref = {"ila": 2 * reference_iladapter_params(d, r, True)}
    ref["ila+"] = ref["ila"] + 10 * reference_iladapter_params(d, r, False)
    ref["ila++"] = ref["ila"] + 24 * (d * r + r + r * d + d)
    assert ref == {"ila": 40_496, "ila+": 173_856, "ila++": 354_032}
    # ours leaves out the two biases per inter-layer adapter that the BN right after them cancels: 16 each
    ours = {v: vit_b16_trainable(v) for v in ("ila", "ila+", "ila++")}
    assert ours == {"ila": ref["ila"] - 2 * 16, "ila+": ref["ila+"] - 12 * 16, "ila++": ref["ila++"] - 2 * 16}
    assert ours["ila"] + d == 41_232  # with the CLS token


@pytest.mark.parametrize("variant", ["ila", "ila+", "ila++"])
def test_trainable_parameter_count(variant: str) -> None:
    d, r, depth = 48, 4, 6
    vit = narrow_vit(64, 8, depth)
    _, backbone_total = count_parameters(vit)
    attach_ila(vit, variant, width=r)
    n_down = 2
    n_plus = depth - n_down if variant == "ila+" else 0
    n_parallel = 2 * depth if variant == "ila++" else 0
    expected = (
        d  # CLS token
        + n_down * inter_layer_params(d, r, True)
        + n_plus * inter_layer_params(d, r, False)
        + n_parallel * (d * r + r + r * d + d)
    )
    assert count_parameters(vit) == (expected, backbone_total + expected - d)


def xavier_bound(layer: torch.nn.Linear) -> float:
    return math.sqrt(6 / (layer.in_features + layer.out_features))


def test_ila_plus_plus_blocks_follow_the_parallel_adapter_formula() -> None:
    torch.manual_seed(0)
    vit = narrow_vit(24, 4, depth=3)
    original = copy.deepcopy(vit).eval()
    attach_ila(vit, "ila++").eval()
    assert sum(isinstance(m, InterLayerAdapter) for m in vit.blocks) == 2  # the down-sampling ones only, no ila+
    blk = vit.blocks[0]
    ref = original.blocks[0]
    for adapter in (blk.attn, blk.mlp):  # Xavier-uniform for BOTH projections, zero biases, dropout 0.1
        down, up = adapter.adapter[0], adapter.adapter[2]
        for layer in (down, up):
            assert layer.weight.abs().max() <= xavier_bound(layer) and layer.weight.std() > xavier_bound(layer) / 3
            assert not layer.bias.any()
        assert adapter.drop.p == 0.1
    with torch.no_grad():  # non-zero biases too, so that their placement matters
        for p in [*blk.attn.adapter.parameters(), *blk.mlp.adapter.parameters()]:
            p.normal_(0, 0.3)
    a1, a2 = blk.attn.adapter, blk.mlp.adapter

    def adapter(x: torch.Tensor, a: torch.nn.Sequential) -> torch.Tensor:
        return F.gelu(x @ a[0].weight.T + a[0].bias) @ a[2].weight.T + a[2].bias

    x = torch.randn(2, 37, 48)
    with torch.no_grad():
        h = ref.norm1(x)
        x1 = x + ref.attn(h) + adapter(h, a1)  # the reference's parallel form beside attention ...
        h = ref.norm2(x1)
        expected = x1 + ref.mlp(h) + adapter(h, a2)  # ... and beside the MLP
        torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=1e-5)
        assert (blk(x) - ref(x)).abs().max() > 0.1  # the adapters change the block from init on


def test_frozen_blocks_keep_hidden_dropout_in_training() -> None:
    torch.manual_seed(0)
    vit = narrow_vit(24, 4, depth=3)
    ref = copy.deepcopy(vit.blocks[0]).eval()
    blk = attach_ila(vit, "ila++").blocks[0]
    # the reference's hidden dropout 0.1: on attention's output projection and the MLP's output, not inside
    assert (blk.attn.module.proj_drop.p, blk.mlp.module.drop2.p, blk.mlp.module.drop1.p) == (0.1, 0.1, 0.0)
    x = torch.randn(2, 37, 48)
    with torch.no_grad():
        assert torch.equal(blk.eval()(x), blk(x))
        assert not torch.equal(blk.train()(x), blk.eval()(x))
        # dropout 1 on the adapter branches and none on the frozen ones: in training, the block is the original
        blk.attn.drop.p = blk.mlp.drop.p = 1.0
        blk.attn.module.proj_drop.p = blk.mlp.module.drop2.p = 0.0
        torch.testing.assert_close(blk.train()(x), ref(x))


def test_plus_positions_and_bad_settings() -> None:
    vit = attach_ila(narrow_vit(24, 4, depth=3), "ila+", positions=[1], plus_positions=[0])
    kinds = [type(m).__name__ + ("-ds" if getattr(m, "downsample", False) else "") for m in vit.blocks]
    assert kinds == ["Block", "InterLayerAdapter", "Block", "InterLayerAdapter-ds", "Block"]
    with pytest.raises(ValueError, match="already hold adapters"):
        attach_ila(vit, "ila")
    with pytest.raises(ValueError, match="variant must be one of"):
        attach_ila(narrow_vit(24, 4, depth=3), "ila+++")
    with pytest.raises(ValueError, match="positions must be distinct"):
        attach_ila(narrow_vit(24, 4, depth=3), positions=[3])
    with pytest.raises(ValueError, match="overlap"):
        attach_ila(narrow_vit(24, 4, depth=3), "ila+", positions=[0], plus_positions=[0])
    with pytest.raises(ValueError, match="to nothing"):
        attach_ila(narrow_vit(24, 4, depth=3), positions=[0, 1, 2])
    with pytest.raises(ValueError, match="at least 3 blocks"):
        attach_ila(narrow_vit(24, 4, depth=2))
    with pytest.raises(ValueError, match="G\\*G patch tokens"):
        InterLayerAdapter(48)(torch.randn(1, 1 + 15, 48))
