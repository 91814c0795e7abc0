"""GLSim pieces against formulas written out here (METHODS §2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sslfg.models.backbone import create_vit, forward_tokens, new_block, timm_kwargs
from sslfg.models.glsim import (
    GLSim,
    ViTClassifier,
    at_least,
    classification_loss,
    crop_and_resize,
    gls_boxes,
    gls_scores,
)
from sslfg.models.ila import attach_ila, final_grid
from tests.conftest import TINY_MODEL


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """16-pixel images, 4-pixel patches: G = 4, N = 16, D = 32."""
    torch.manual_seed(seed)
    return create_vit(TINY_MODEL["name"], timm_kwargs(16, TINY_MODEL["patch_size"], TINY_MODEL["kwargs"]))


def reference_boxes(tokens: torch.Tensor, patch_size: int, k: int, box: str) -> list[list[int]]:
    """Plain loops: cos = a·b / (|a| |b|), the k best patches, min/max of their rows and columns."""
    out = []
    for item in tokens.double():
        cls, patches = item[0], item[1:]
        g = math.isqrt(len(patches))
        cos = [float(cls @ p) / (float(cls.norm()) * float(p.norm())) for p in patches]
        best = sorted(range(len(cos)), key=lambda j: -cos[j])[:k]
        rows, cols = [j // g for j in best], [j % g for j in best]
        end = 1 if box == "inclusive" else 0
        out.append([v * patch_size for v in (min(rows), min(cols), max(rows) + end, max(cols) + end)])
    return out


@pytest.mark.parametrize("box", ["inclusive", "reference"])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_gls_boxes_match_loops(box: str, k: int) -> None:
    torch.manual_seed(k)
    tokens = torch.randn(4, 1 + 16, 8)
    got = gls_boxes(tokens, patch_size=4, k=k, box=box)
    assert got.dtype == torch.int64 and got.shape == (4, 4)
    assert got.tolist() == reference_boxes(tokens, 4, k, box)
    if k == 16:  # every patch: the whole image, or the reference's one patch short per side
        assert got.tolist() == [[0, 0, 16, 16] if box == "inclusive" else [0, 0, 12, 12]] * 4


def test_gls_scores_are_cosines_and_skip_extra_prefix_tokens() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(2, 3 + 9, 8)  # CLS, two register tokens, 3x3 grid
    ref = torch.stack([F.cosine_similarity(tokens[b, :1], tokens[b, 3:], dim=-1) for b in range(2)])
    torch.testing.assert_close(gls_scores(tokens, num_prefix_tokens=3), ref)
    without_registers = torch.cat([tokens[:, :1], tokens[:, 3:]], dim=1)
    assert torch.equal(gls_boxes(tokens, 2, 3, num_prefix_tokens=3), gls_boxes(without_registers, 2, 3))


def test_gls_boxes_reject_bad_settings() -> None:
    tokens = torch.randn(2, 1 + 16, 8)
    for k in (0, 17):
        with pytest.raises(ValueError, match="k must be between 1 and the number of patches"):
            gls_boxes(tokens, 4, k)
    with pytest.raises(ValueError, match="box must be one of"):
        gls_boxes(tokens, 4, 2, box="exclusive")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="square patch grid"):
        gls_boxes(torch.randn(2, 1 + 15, 8), 4, 2)
    with pytest.raises(ValueError, match="k must be"):
        GLSim(tiny_vit(), num_classes=3, k=17)


def test_reference_box_is_empty_for_one_patch_and_the_crop_takes_that_patch() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(3, 1 + 16, 8)
    ref, inc = gls_boxes(tokens, 4, 1, box="reference"), gls_boxes(tokens, 4, 1)
    assert torch.equal(ref[:, :2], ref[:, 2:])  # y1 = y0, x1 = x0: empty, kept as the reference computes it
    assert torch.equal(at_least(ref, 4), inc) and torch.equal(at_least(inc, 4), inc)
    images = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(crop_and_resize(images, at_least(ref, 4), 16), crop_and_resize(images, inc, 16))
    model = GLSim(tiny_vit(), num_classes=3, k=1, box="reference")
    out = model(images, return_crops=True)
    assert torch.equal(out["boxes"][:, :2], out["boxes"][:, 2:]) and out["crops"].isfinite().all()


def test_crop_lands_on_the_bright_square() -> None:
    torch.manual_seed(0)
    p, g = 4, 8  # 32-pixel images
    images = torch.rand(2, 3, 32, 32) * 0.2
    squares = [(2, 3), (5, 0)]  # top-left patch (row, col) of a 3x3-patch bright square per image
    tokens = torch.randn(2, 1 + g * g, 16)
    for b, (r, c) in enumerate(squares):
        images[b, :, r * p : (r + 3) * p, c * p : (c + 3) * p] = 1.0
        for j in range(g * g):
            if r <= j // g < r + 3 and c <= j % g < c + 3:  # patches of the square point along CLS
                tokens[b, 1 + j] = tokens[b, 0] + 0.1 * torch.randn(16)
    boxes = gls_boxes(tokens, p, k=9)
    assert boxes.tolist() == [[r * p, c * p, (r + 3) * p, (c + 3) * p] for r, c in squares]
    crops = crop_and_resize(images, boxes, 32)
    # Enlarging 12 → 32 pixels, only the first and last output row/column sample within half a pixel
    # outside the square (weight 0.3125 on a dark pixel): the mean stays above 1 − 4/32 · 0.3125 ≈ 0.96.
    for b in range(2):
        assert crops[b].mean() > 0.96 and images[b].mean() < 0.4
        torch.testing.assert_close(crops[b, :, 1:-1, 1:-1], torch.ones(3, 30, 30))  # inside: all samples bright


@pytest.mark.parametrize("size", [24, 10])
def test_crop_of_the_whole_image_is_a_resize(size: int) -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    boxes = torch.tensor([[0, 0, 16, 16]] * 3)
    ref = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    # Same sample points and weights, computed in a different order: float32 rounding, values in [0, 1].
    torch.testing.assert_close(crop_and_resize(images, boxes, size), ref, rtol=0, atol=1e-5)


def test_crop_of_a_sub_box_is_interpolate_of_the_slice() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[2, 3, 10, 9], [5, 1, 12, 15]])  # (y0, x0, y1, x1), non-square
    refs = []
    for b, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        crop = images[b : b + 1, :, y0:y1, x0:x1]
        # roi_align reads the pixels just outside the box where interpolate repeats the slice's edge:
        # make that ring equal the edge, so that both define the same crop and must agree to rounding.
        images[b : b + 1, :, y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = F.pad(crop, (1, 1, 1, 1), mode="replicate")
        refs.append(F.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False))
    torch.testing.assert_close(crop_and_resize(images, boxes, 16), torch.cat(refs), rtol=0, atol=1e-5)


def test_forward_tokens_with_another_cls_token() -> None:
    vit = tiny_vit().eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(forward_tokens(vit, x, cls_token=vit.cls_token.detach().clone()), forward_tokens(vit, x))
    token = torch.randn(1, 1, 32)
    swapped = copy.deepcopy(vit)
    swapped.cls_token.data.copy_(token)  # what timm computes with that token in the CLS slot
    torch.testing.assert_close(forward_tokens(vit, x, cls_token=token), forward_tokens(swapped, x))
    dropping = create_vit(TINY_MODEL["name"], timm_kwargs(16, 4, {**TINY_MODEL["kwargs"], "pos_drop_rate": 0.1}))
    with pytest.raises(ValueError, match="needs pos_drop_rate 0"):
        forward_tokens(dropping.train(), x, cls_token=token)


def test_new_block_is_a_fresh_block_of_the_backbone_kind() -> None:
    vit = tiny_vit()
    ref = vit.blocks[0]
    block = new_block(vit)
    assert type(block) is type(ref) and block.attn.num_heads == ref.attn.num_heads == 2
    assert block.mlp.fc1.weight.shape == ref.mlp.fc1.weight.shape and block.attn.qkv.bias is not None
    assert type(block.norm1) is type(ref.norm1) and block.norm1.eps == ref.norm1.eps
    assert not torch.equal(block.attn.qkv.weight, ref.attn.qkv.weight)
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.005  # timm's trunc_normal(std 0.02)
    assert new_block(vit, num_heads=4).attn.num_heads == 4


def test_glsim_starts_at_zero_with_a_copied_crop_token() -> None:
    model = GLSim(tiny_vit(), num_classes=5, k=3)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, return_crops=True)
    assert torch.equal(out["logits"], torch.zeros(2, 5)) and torch.equal(model(x), torch.zeros(2, 5))
    assert out["boxes"].shape == (2, 4) and out["boxes"].dtype == torch.int64
    assert out["crops"].shape == (2, 3, 16, 16)
    assert isinstance(model.crop_cls_token, torch.nn.Parameter) and model.crop_cls_token is not model.encoder.cls_token
    assert torch.equal(model.crop_cls_token, model.encoder.cls_token)
    assert model.crop_cls_token.data_ptr() != model.encoder.cls_token.data_ptr()


def glsim_with_random_head(seed: int = 0) -> GLSim:
    model = GLSim(tiny_vit(seed), num_classes=5, k=3).train()
    # A zero head passes no gradient back; give it weights so that everything behind it learns.
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_glsim_logits_follow_the_method() -> None:
    model = glsim_with_random_head().eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x, return_crops=True)
    with torch.no_grad():
        tokens = forward_tokens(model.encoder, x)
        boxes = gls_boxes(tokens, 4, 3)
        crops = crop_and_resize(x, boxes, 16)
        crop_cls = forward_tokens(model.encoder, crops, cls_token=model.crop_cls_token)[:, 0]
        z = model.norm(model.aggregator(torch.stack([tokens[:, 0], crop_cls], dim=1)))
        logits = z[:, 0] @ model.head.weight.T + model.head.bias
    assert torch.equal(out["boxes"], boxes) and torch.equal(out["crops"], crops)
    torch.testing.assert_close(out["logits"], logits)


def encoder_grads(model: GLSim, x: torch.Tensor, y: torch.Tensor, detach_crop_pass: bool) -> dict[str, torch.Tensor]:
    model.zero_grad()
    calls = []

    def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return output.detach() if detach_crop_pass and len(calls) == 2 else output

    handle = model.encoder.blocks.register_forward_hook(hook)
    classification_loss(model(x), y).backward()
    handle.remove()
    assert len(calls) == 2  # the image pass, then the crop pass
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_every_part_through_both_passes() -> None:
    model = glsim_with_random_head()
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    grads = encoder_grads(model, x, y, detach_crop_pass=False)
    learners = ("encoder.blocks.0.", "encoder.blocks.1.", "encoder.cls_token", "crop_cls_token", "aggregator.")
    for prefix in (*learners, "norm.", "head."):
        assert any(n.startswith(prefix) and g.abs().sum() > 0 for n, g in grads.items()), prefix
    image_pass_only = encoder_grads(model, x, y, detach_crop_pass=True)
    assert "crop_cls_token" not in image_pass_only or image_pass_only["crop_cls_token"].abs().sum() == 0
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight"):
        assert not torch.allclose(grads[name], image_pass_only[name])


def test_classification_loss_is_label_smoothed_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(4, 5), torch.tensor([0, 3, 4, 1])
    logp = logits.double().log_softmax(-1)
    ref = sum(-(0.9 * logp[i, y[i]] + 0.1 * logp[i].mean()) for i in range(4)) / 4  # ε spread over all C
    torch.testing.assert_close(classification_loss(logits, y).double(), ref, rtol=1e-6, atol=1e-7)


def test_vit_classifier_starts_at_zero_and_reads_the_cls_token() -> None:
    model = ViTClassifier(tiny_vit(), num_classes=5)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(model(x), torch.zeros(3, 5))
    out = model(x, return_crops=True)
    assert set(out) == {"logits"} and out["logits"].shape == (3, 5)
    torch.nn.init.normal_(model.head.weight)
    ref = forward_tokens(model.encoder, x)[:, 0] @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), ref)


def test_boxes_on_the_grid_shrunk_by_ila_are_centred_on_their_input_patches() -> None:
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2))
    model = GLSim(vit, num_classes=3, k=3)
    attach_ila(vit, variant="ila", positions=[0])  # 8x8 input grid → 6x6 output grid
    assert final_grid(vit) == 6
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        boxes = model(x, return_crops=True)["boxes"]
        tokens = forward_tokens(vit, x)
    # Output cell (r, c) sees input patches r..r+2, c..c+2: its centre is input patch (r + 1, c + 1).
    expected = (gls_boxes(tokens, 1, 3) + 1) * 4
    assert torch.equal(boxes, expected)
    assert boxes.min() >= 4 and boxes.max() <= 28
