"""GLSim pieces against formulas written out here (METHODS §2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

from sslfg.config import load_config
from sslfg.finetune import build_classifier
from sslfg.models.backbone import forward_tokens, new_block, timm_kwargs
from sslfg.models.glsim import (
    GLSim,
    ViTClassifier,
    at_least,
    classification_loss,
    crop_and_resize,
    gls_boxes,
    gls_scores,
)
from sslfg.models.ila import InterLayerAdapter, attach_ila, final_grid
from sslfg.schema import FinetuneConfig
from sslfg.weights import create_vit
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


def reference_crop(image: torch.Tensor, box: list[int], size: int) -> torch.Tensor:
    """The reference's crop of one image (C, H, W): slice the box, F.interpolate bilinear with align_corners=True."""
    y0, x0, y1, x1 = box
    return F.interpolate(image[None, :, y0:y1, x0:x1], size=(size, size), mode="bilinear", align_corners=True)[0]


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
    # align_corners=True samples from the first to the last pixel centre of the box, never outside it:
    # every output pixel is a mix of bright pixels only.
    assert images.mean() < 0.4
    torch.testing.assert_close(crops, torch.ones(2, 3, 32, 32))


@pytest.mark.parametrize("size", [24, 10])
def test_crop_of_the_whole_image_is_a_resize(size: int) -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    boxes = torch.tensor([[0, 0, 16, 16]] * 3)
    ref = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
    # Same sample points and weights, computed in a different order: float32 rounding, values in [0, 1].
    torch.testing.assert_close(crop_and_resize(images, boxes, size), ref, rtol=0, atol=1e-5)
    # The reference's corners are the image's corner pixels, exactly.
    corners = crop_and_resize(images, boxes, size)[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    torch.testing.assert_close(corners, images[..., [0, 0, -1, -1], [0, -1, 0, -1]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("image_size", [16, 224])
def test_crop_of_a_sub_box_is_interpolate_of_the_slice(image_size: int) -> None:
    torch.manual_seed(image_size)
    images = torch.rand(4, 3, image_size, image_size)
    y0, x0 = torch.randint(0, image_size - 1, (2, 4))
    y1 = y0 + 1 + (torch.rand(4) * (image_size - y0 - 1)).long()  # 1..image_size - y0 rows: non-square boxes
    x1 = x0 + 1 + (torch.rand(4) * (image_size - x0 - 1)).long()
    boxes = torch.stack([y0, x0, y1, x1], dim=1)
    boxes[0] = torch.tensor([3, 5, 4, 9])  # one row high: every output row repeats it
    refs = torch.stack([reference_crop(images[b], box, image_size) for b, box in enumerate(boxes.tolist())])
    # float32 sample coordinates up to 223 carry ~1e-5 pixel rounding, in both computations.
    torch.testing.assert_close(crop_and_resize(images, boxes, image_size), refs, rtol=0, atol=1e-4)


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


def reference_glsim_logits(
    model: GLSim, x: torch.Tensor, patch: int, box: str
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """GLSim's forward as the reference code computes it, one image at a time, on timm's own ViT forward.

    Boxes from F.cosine_similarity and topk; the crop: rows/columns min·P to max·P (+P with the whole
    selected patches), far edges at least one patch past the near ones and inside the image, sliced and
    F.interpolate(bilinear, align_corners=True); the crop pass: timm's forward_features of a copy whose
    CLS token is the crop token; aggregator block, LayerNorm, head on token 0 written out.
    """
    size = x.shape[-1]
    crop_vit = copy.deepcopy(model.encoder)
    crop_vit.cls_token.data.copy_(model.crop_cls_token)
    boxes, crops, logits = [], [], []
    for image in x:
        tokens = model.encoder.forward_features(image[None])[0]  # (1 + N, D), after the final norm
        g = math.isqrt(tokens.shape[0] - 1)
        top = F.cosine_similarity(tokens[:1], tokens[1:], dim=-1).topk(model.k).indices.tolist()
        rows, cols = [j // g for j in top], [j % g for j in top]
        end = patch if box == "inclusive" else 0
        y0, x0, y1, x1 = min(rows) * patch, min(cols) * patch, max(rows) * patch + end, max(cols) * patch + end
        boxes.append([y0, x0, y1, x1])
        y1, x1 = min(max(y1, y0 + patch), size), min(max(x1, x0 + patch), size)
        crop = reference_crop(image, [y0, x0, y1, x1], size)
        crops.append(crop)
        pair = torch.stack([tokens[0], crop_vit.forward_features(crop[None])[0, 0]])[None]  # (1, 2, D)
        z = F.layer_norm(model.aggregator(pair), (pair.shape[-1],), model.norm.weight, model.norm.bias, eps=1e-6)
        logits.append(z[0, 0] @ model.head.weight.T + model.head.bias)
    return boxes, torch.stack(crops), torch.stack(logits)


@pytest.mark.parametrize(("box", "k"), [("inclusive", 3), ("reference", 3), ("reference", 1)])
def test_glsim_logits_follow_the_method(box: str, k: int) -> None:
    torch.manual_seed(0)
    model = GLSim(tiny_vit(), num_classes=5, k=k, box=box, drop_path_rate=0.1).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.crop_cls_token, std=1.0)  # as after training: no longer the image CLS token
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model(x, return_crops=True)
        boxes, crops, logits = reference_glsim_logits(model, x, patch=4, box=box)
    assert out["boxes"].tolist() == boxes
    torch.testing.assert_close(out["crops"], crops, rtol=0, atol=1e-4)  # pixels ~ N(0, 1), float32 coordinates
    assert logits.abs().max() > 0.1  # the head reads something
    torch.testing.assert_close(out["logits"], logits, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("positions", [[0], [0, 1]])
def test_boxes_on_the_grid_shrunk_by_ila_are_centred_on_their_input_patches(positions: list[int]) -> None:
    torch.manual_seed(0)
    p = 4
    vit = create_vit("vit_tiny_patch16_224", dict(img_size=32, patch_size=p, embed_dim=32, depth=3, num_heads=2))
    model = GLSim(vit, num_classes=3, k=3)
    attach_ila(vit, variant="ila", positions=positions)  # 8x8 input grid → 6x6 (→ 4x4) output grid
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        boxes = model(x, return_crops=True)["boxes"]
        tokens = vit.forward_features(x)
    # Receptive-field geometry: each down-sampling adapter's residual conv (kernel K, stride 1, padding
    # Q) maps output cell r to input cells r − Q .. r − Q + K − 1, whose centre cell is r + (K − 1)/2 − Q.
    convs = [m.reduce for m in vit.blocks if isinstance(m, InterLayerAdapter) and m.downsample]
    assert len(convs) == len(positions) and all(c.stride == (1, 1) for c in convs)
    offset = sum((c.kernel_size[0] - 1) / 2 - c.padding[0] for c in convs)
    g = 8 - 2 * len(positions)
    assert final_grid(vit) == g and tokens.shape[1] == 1 + g * g
    expected = []
    for y0, x0, y1, x1 in reference_boxes(tokens, 1, 3, "inclusive"):  # in output cells, end-exclusive
        # centre input cell of output cell r: r + offset; its pixels [(r + offset)·P, (r + offset + 1)·P)
        expected.append([int((cell + offset) * p) for cell in (y0, x0, y1, x1)])
    assert boxes.tolist() == expected
    assert boxes.min() >= offset * p and boxes.max() <= 32 - offset * p


def test_drop_path_is_the_same_in_every_block_and_the_aggregator() -> None:
    """GLSim's recipe: drop path 0.1 in every encoder block (not timm's ramp 0 → 0.1) and in the aggregator."""
    overrides = ["model.name=vit_tiny_patch16_224", "model.patch_size=4", "data.image_size=16",
                 "model.kwargs={embed_dim: 32, depth: 3, num_heads: 2}", "model.drop_path_rate=0.1"]
    for head in ("glsim", "vit"):
        cfg = load_config(None, [*overrides, f"model.head={head}"], FinetuneConfig)
        model, _ = build_classifier(cfg, num_classes=3)
        blocks = [*model.encoder.blocks, *([model.aggregator] if head == "glsim" else [])]
        rates = [getattr(b, n).drop_prob if isinstance(getattr(b, n), DropPath) else 0.0
                 for b in blocks for n in ("drop_path1", "drop_path2")]
        assert rates == [0.1] * 2 * len(blocks), (head, rates)
    model = GLSim(tiny_vit(), num_classes=3, drop_path_rate=0.0)
    assert not any(isinstance(m, DropPath) for m in model.modules())


def test_aggregator_is_xavier_initialised_like_the_reference() -> None:
    """The reference's aggregator: Xavier-uniform Linear weights (q, k, v separate D×D layers), biases N(0, 1e-6)."""
    torch.manual_seed(0)
    d = 64
    vit = create_vit("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=d, depth=1, num_heads=2))
    agg = GLSim(vit, num_classes=3).aggregator
    layers = {"q": (agg.attn.qkv.weight[:d], d, d), "k": (agg.attn.qkv.weight[d : 2 * d], d, d),
              "v": (agg.attn.qkv.weight[2 * d :], d, d), "proj": (agg.attn.proj.weight, d, d),
              "fc1": (agg.mlp.fc1.weight, d, 4 * d), "fc2": (agg.mlp.fc2.weight, 4 * d, d)}
    for name, (w, fan_in, fan_out) in layers.items():
        bound = math.sqrt(6 / (fan_in + fan_out))  # U(−a, a), std a / √3
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.06, name
    for bias in (agg.attn.qkv.bias, agg.attn.proj.bias, agg.mlp.fc1.bias, agg.mlp.fc2.bias):
        assert 0 < bias.abs().max() < 1e-5
