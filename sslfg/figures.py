"""Figures written into a run's figures/ folder (PIL only: no plotting backend needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import Tensor

DIM = 0.2  # brightness of the patches the local branch drops


def _to_pil(img: Tensor, scale: int) -> Image.Image:
    """(3, H, W) in [0, 1] → PIL, enlarged `scale` times with nearest neighbour."""
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def kept_overlay(images: Tensor, keep_idx: Tensor, patch_size: int) -> Tensor:
    """Images (B, 3, H, W) with the patches outside keep_idx (B, K) dimmed to DIM."""
    b, _, h, w = images.shape
    g = h // patch_size
    weight = torch.full((b, g * g), DIM, device=images.device).scatter_(1, keep_idx, 1.0)
    weight = weight.view(b, 1, g, g).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return images * weight


def save_mask_figure(view1: Tensor, view2: Tensor, keep1: Tensor, keep2: Tensor, patch_size: int, path: Path,
                     title: str) -> Path:
    """One row per image: view 1, its kept patches, view 2, its kept patches. Views in [0, 1]."""
    scale = max(1, 128 // view1.shape[-1])
    columns = [view1, kept_overlay(view1, keep1, patch_size), view2, kept_overlay(view2, keep2, patch_size)]
    side, pad, head = view1.shape[-1] * scale, 4, 20
    sheet = Image.new("RGB", (4 * (side + pad) + pad, len(view1) * (side + pad) + pad + head), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title, fill="black")
    for row in range(len(view1)):
        for col, images in enumerate(columns):
            sheet.paste(_to_pil(images[row], scale), (pad + col * (side + pad), head + pad + row * (side + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
