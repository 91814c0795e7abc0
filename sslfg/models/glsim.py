"""GLSim: global-local similarity crops for fine-tuning (METHODS §2), and the plain ViT baseline.

Both classifiers share one forward contract: `model(x)` gives logits (B, C);
`model(x, return_crops=True)` gives a dict with "logits" and, for GLSim, "boxes" and "crops".
Train either with `classification_loss` (cross-entropy, label smoothing 0.1). Both take
`drop_path_rate` and set it in every block, as GLSim's reference recipe does for both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from sslfg.models.backbone import forward_tokens, grid_size, new_block, pooled_feature

BoxMode = Literal["inclusive", "reference"]
BOX_MODES = ("inclusive", "reference")
LABEL_SMOOTHING = 0.1


def check_gls_args(num_patches: int, k: int, box: str) -> None:
    """Raises a ValueError naming the bad GLSim setting."""
    if box not in BOX_MODES:
        raise ValueError(f"GLSim box must be one of {BOX_MODES}, got '{box}'")
    if not 1 <= k <= num_patches:
        raise ValueError(f"GLSim k must be between 1 and the number of patches ({num_patches}), got {k}")


def gls_scores(tokens: Tensor, num_prefix_tokens: int = 1) -> Tensor:
    """sim_j = cos(CLS, patch_j), (B, N), from encoder tokens (B, prefix + N, D), CLS first.

    Normalise + batched dot product: 2.9× (224 px) to 5.9× (448 px) faster than a broadcasting
    F.cosine_similarity on this CPU (bench/glsim_select.py).
    Float32 with autocast off here (it would recast the einsum to bf16), so that the top-k does not
    depend on bf16 rounding.
    """
    with torch.autocast(tokens.device.type, enabled=False):
        x = F.normalize(tokens.float(), dim=-1)
        return torch.einsum("bd,bnd->bn", x[:, 0], x[:, num_prefix_tokens:])


def gls_boxes(
    tokens: Tensor, patch_size: int, k: int, box: BoxMode = "inclusive", num_prefix_tokens: int = 1
) -> Tensor:
    """Pixel boxes (y0, x0, y1, x1), end-exclusive, int64 (B, 4), around the k patches most similar to CLS.

    tokens (B, prefix + N, D) with CLS first and N = G² patches in row-major order.
    "inclusive": the box covers the whole selected patches, y1 = (max r + 1)·P.
    "reference": y1 = max r·P as the reference code, which drops the last selected row and column
    and is empty when they coincide (k = 1); `at_least` grows such a box for cropping.
    """
    scores = gls_scores(tokens, num_prefix_tokens)
    n = scores.shape[1]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"GLSim needs a square patch grid, got {n} patch tokens")
    check_gls_args(n, k, box)
    idx = scores.topk(k, dim=1).indices
    rows, cols = idx // g, idx % g
    end = 1 if box == "inclusive" else 0
    return torch.stack([rows.amin(1), cols.amin(1), rows.amax(1) + end, cols.amax(1) + end], dim=1) * patch_size


def at_least(boxes: Tensor, extent: int) -> Tensor:
    """Boxes (B, 4) whose far edges are moved so that each side spans at least `extent` pixels.

    The reference crop does this (one patch) before cropping; a box from gls_boxes starts at least
    one patch before the far image edge, so the result stays inside the image.
    """
    y0, x0, y1, x1 = boxes.unbind(1)
    return torch.stack([y0, x0, torch.maximum(y1, y0 + extent), torch.maximum(x1, x0 + extent)], dim=1)


def crop_and_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Each image cropped to its box (y0, x0, y1, x1), end-exclusive pixels, resized to (B, C, size, size).

    The reference resizes each crop with F.interpolate(bilinear, align_corners=True): output pixel i
    samples the crop at i·(h − 1)/(size − 1), so the first and last samples sit on the centres of the
    crop's edge pixels. One grid_sample call (align_corners=True, where normalised −1 and 1 are the
    image's edge pixel centres) samples those points for the whole batch.
    """
    _, _, h, w = images.shape
    y0, x0, y1, x1 = boxes.to(images.device, torch.float32).unbind(1)
    t = torch.linspace(0, 1, size, device=images.device)
    ys = (y0[:, None] + t * (y1 - y0 - 1)[:, None]) * (2 / (h - 1)) - 1  # (B, size), normalised rows
    xs = (x0[:, None] + t * (x1 - x0 - 1)[:, None]) * (2 / (w - 1)) - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (B, size, size, (x, y))
    # float32: bf16 holds pixel coordinates exactly only up to 256
    crops = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return crops.to(images.dtype)


def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = LABEL_SMOOTHING) -> Tensor:
    """Cross-entropy with label smoothing (0.1), the loss of both GLSim and the plain ViT fine-tune."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with zero weights and bias: every logit is 0 at initialisation."""
    head = nn.Linear(in_features, out_features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def uniform_drop_path(blocks: Iterable[nn.Module], rate: float) -> None:
    """Drop path `rate` on both residual branches of every block.

    GLSim's reference uses one rate in every block; timm ramps it linearly from 0 over depth, which
    halves the mean rate.
    """
    for block in blocks:
        names = [name for name, _ in block.named_children() if name.startswith("drop_path")]
        if not names:
            raise ValueError(f"{type(block).__name__} has no drop_path branches to set")
        for name in names:
            setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


@torch.no_grad()
def xavier_init(module: nn.Module) -> None:
    """The reference's init for a new block: Xavier-uniform Linear weights, biases N(0, 1e-6).

    Its q, k and v are separate (D, D) layers; timm fuses them into one qkv (3D, D), so each third
    gets its own Xavier bound.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            for w in m.weight.chunk(3 if name.endswith("qkv") else 1, dim=0):
                nn.init.xavier_uniform_(w)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=1e-6)


def aggregator_block(vit: VisionTransformer, num_heads: int | None, drop_path_rate: float) -> Block:
    """GLSim's aggregator: a new block of the backbone's kind, initialised and regularised as the reference's."""
    block = new_block(vit, num_heads)
    xavier_init(block)
    uniform_drop_path([block], drop_path_rate)
    return block


class GLSim(nn.Module):
    """A timm ViT (built by create_vit, no classifier) with GLSim's crop branch, aggregator and head.

    forward: X = f(x); boxes around the top-k GLS patches; crops of x resized to x's size; Xc = f(crops)
    with the crop CLS token; aggregator block + LayerNorm over [X[:, 0], Xc[:, 0]]; head on token 0.
    Gradients flow through both encoder passes; the box selection itself is not differentiable.
    `drop_path_rate` is set in every encoder block and in the aggregator (`uniform_drop_path`).
    """

    def __init__(
        self,
        vit: VisionTransformer,
        num_classes: int,
        k: int = 8,
        box: BoxMode = "inclusive",
        aggregator_heads: int | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        check_gls_args(grid_size(vit) ** 2, k, box)
        uniform_drop_path(vit.blocks, drop_path_rate)
        self.encoder = vit
        self.k = k
        self.box = box
        self.crop_cls_token = nn.Parameter(vit.cls_token.detach().clone())
        self.aggregator = aggregator_block(vit, aggregator_heads, drop_path_rate)
        self.norm = nn.LayerNorm(vit.embed_dim, eps=1e-6)  # timm ViT's final-norm epsilon
        self.head = zero_linear(vit.embed_dim, num_classes)

    def forward(self, x: Tensor, return_crops: bool = False) -> Tensor | dict[str, Tensor]:
        """x (B, 3, S, S) → logits (B, C), or {"logits", "boxes" (B, 4) int64, "crops" (B, 3, S, S)}."""
        size, prefix = x.shape[-1], self.encoder.num_prefix_tokens
        grid = grid_size(self.encoder)
        patch_size = size // grid
        tokens = forward_tokens(self.encoder, x)
        # ILA's valid 3x3 convolutions shrink the output grid by 2 per down-sampling adapter; output
        # cell (r, c) is centred on input patch (r + shift, c + shift). Without adapters shift = 0.
        shift = (grid - math.isqrt(tokens.shape[1] - prefix)) // 2
        boxes = (gls_boxes(tokens.detach(), 1, self.k, self.box, prefix) + shift) * patch_size
        crops = crop_and_resize(x, at_least(boxes, patch_size), size)
        crop_tokens = forward_tokens(self.encoder, crops, cls_token=self.crop_cls_token)
        z = self.norm(self.aggregator(torch.stack([tokens[:, 0], crop_tokens[:, 0]], dim=1)))
        logits = self.head(z[:, 0])
        return {"logits": logits, "boxes": boxes, "crops": crops} if return_crops else logits


class ViTClassifier(nn.Module):
    """The plain fine-tune baseline: zero-initialised Linear on the CLS token after the final norm,
    `drop_path_rate` in every block as in GLSim; on another timm model, on its pooled feature (its drop path is
    timm's own, set when it is built)."""

    def __init__(self, vit: nn.Module, num_classes: int, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if isinstance(vit, VisionTransformer):
            uniform_drop_path(vit.blocks, drop_path_rate)
        self.encoder = vit
        self.head = zero_linear(vit.num_features, num_classes)

    def forward(self, x: Tensor, return_crops: bool = False) -> Tensor | dict[str, Tensor]:
        """x (B, 3, H, W) → logits (B, C), or {"logits"} (a plain head makes no crops)."""
        logits = self.head(pooled_feature(self.encoder, x))
        return {"logits": logits} if return_crops else logits
