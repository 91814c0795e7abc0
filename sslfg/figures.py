"""Figures written into a run's figures/ folder (PIL only: no plotting backend needed).

Every figure draws one thing in one colour, named in its caption: the object box green, the GLS box
red, LoDisc's kept patches outlined yellow, and the patches the local branch drops tinted magenta (in
the figure only: the model sees them zero-filled, which on dark images would not show).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

OBJECT_BOX = (0, 200, 0)  # green
GLS_BOX = (230, 0, 0)  # red
KEPT = (230, 200, 0)  # yellow
DROPPED = (255, 0, 255)  # magenta
DROPPED_TINT = 0.6  # share of magenta in a dropped patch: the image still shows through


def _caption_height(caption: str) -> int:
    """Pixels above the first row for `caption` in PIL's default font (about 12 per line)."""
    return 8 + 12 * (caption.count("\n") + 1)


def _to_pil(img: Tensor, scale: int) -> Image.Image:
    """(3, H, W) in [0, 1] → PIL, enlarged `scale` times with nearest neighbour."""
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def kept_overlay(images: Tensor, keep_idx: Tensor, patch_size: int) -> Tensor:
    """Images (B, 3, H, W) in [0, 1] with the patches outside keep_idx (B, K) tinted DROPPED, which contrasts
    with dark and bright images alike."""
    b, _, h, w = images.shape
    g = h // patch_size
    tint = torch.full((b, g * g), DROPPED_TINT, device=images.device).scatter_(1, keep_idx, 0.0)
    tint = tint.view(b, 1, g, g).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    colour = torch.tensor(DROPPED, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) / 255
    return images * (1 - tint) + colour * tint


def save_mask_figure(view1: Tensor, view2: Tensor, keep1: Tensor, keep2: Tensor, patch_size: int, path: Path,
                     title: str) -> Path:
    """One row per image: view 1, its kept patches, view 2, its kept patches (dropped ones tinted magenta).
    Views in [0, 1]."""
    scale = max(1, 128 // view1.shape[-1])
    columns = [view1, kept_overlay(view1, keep1, patch_size), view2, kept_overlay(view2, keep2, patch_size)]
    caption = f"{title}; dropped patches magenta"
    side, pad, head = view1.shape[-1] * scale, 4, _caption_height(caption)
    sheet = Image.new("RGB", (4 * (side + pad) + pad, len(view1) * (side + pad) + pad + head), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), caption, fill="black")
    for row in range(len(view1)):
        for col, images in enumerate(columns):
            sheet.paste(_to_pil(images[row], scale), (pad + col * (side + pad), head + pad + row * (side + pad)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_neighbour_grid(queries: list[Image.Image], neighbours: list[list[Image.Image]], same_class: list[list[bool]],
                        path: Path, side: int = 96) -> Path:
    """One row per query: the query image, then its nearest training images with a green
    (same class) or red (other class) border."""
    border, pad = max(2, side // 24), 6
    columns = 1 + max(len(row) for row in neighbours)
    sheet = Image.new("RGB", (columns * (side + pad) + pad, len(queries) * (side + pad) + pad), "white")
    for r, (query, row, same) in enumerate(zip(queries, neighbours, same_class, strict=True)):
        y = pad + r * (side + pad)
        sheet.paste(query.resize((side, side)), (pad, y))
        for c, (neighbour, ok) in enumerate(zip(row, same, strict=True)):
            thumb = neighbour.resize((side - 2 * border, side - 2 * border))
            framed = ImageOps.expand(thumb, border=border, fill=(0, 170, 0) if ok else (210, 0, 0))
            sheet.paste(framed, (pad + (c + 1) * (side + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_embedding_map(features: Tensor, labels: Tensor, class_names: list[str], path: Path, seed: int = 0,
                       max_points: int = 5000) -> Path:
    """t-SNE (scikit-learn) of the features, coloured by class; at most `max_points` points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(features))[:max_points]
    x, y = features[keep].numpy(), labels[keep].numpy()
    xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=y, cmap="tab20" if y.max() < 20 else "nipy_spectral", s=4)
    if len(class_names) <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=scatter.cmap(scatter.norm(c))) for c in np.unique(y)]
        ax.legend(handles, [class_names[c] for c in np.unique(y)], fontsize=7, loc="best", markerscale=1.5)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"t-SNE of {len(x)} test features")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_crop_figure(images: Tensor, boxes: Tensor, crops: Tensor, scores: Tensor, top_k: int, path: Path) -> Path:
    """One row per image: the image with its GLS box (red, GLS_BOX), the crop the second pass sees, and the
    global-local similarity of every patch (red = high) with the top-k patches outlined; a caption says so.

    images (B, 3, H, W) and crops (B, 3, S, S) in [0, 1]; boxes (B, 4) as (y0, x0, y1, x1); scores (B, N).
    """
    b, _, h, _ = images.shape
    g = int(scores.shape[1] ** 0.5)
    scale = max(1, 128 // h)
    low, high = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
    heat = (scores - low) / (high - low + 1e-8)
    heat = heat.view(b, 1, g, g).repeat_interleave(h // g, 2).repeat_interleave(h // g, 3)
    overlay = 0.4 * images + 0.6 * torch.cat([heat, torch.zeros_like(heat), 1 - heat], dim=1)
    top = scores.topk(top_k, dim=1).indices
    caption = f"GLS box red, its crop,\nsimilarity (red high), top {top_k} outlined"
    side, pad, head = h * scale, 4, _caption_height(caption)
    sheet = Image.new("RGB", (3 * (side + pad) + pad, b * (side + pad) + pad + head), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), caption, fill="black")
    for row in range(b):
        y = head + pad + row * (side + pad)
        for col, picture in enumerate((images[row], crops[row], overlay[row])):
            sheet.paste(_to_pil(picture, scale).resize((side, side), Image.NEAREST), (pad + col * (side + pad), y))
        y0, x0, y1, x1 = (int(v) * scale for v in boxes[row])
        draw.rectangle([pad + x0, y + y0, pad + x1 - 1, y + y1 - 1], outline=GLS_BOX, width=2)
        cell = side // g
        for idx in top[row].tolist():
            r, c = divmod(idx, g)
            left = pad + 2 * (side + pad) + c * cell
            draw.rectangle([left, y + r * cell, left + cell - 1, y + (r + 1) * cell - 1], outline="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_localisation_figure(images: Tensor, boxes: Tensor, keep_idx: Tensor, gls: Tensor, patch_size: int,
                             path: Path, title: str) -> Path:
    """One row per image: the image with the object box (green), LoDisc's kept patches (outlined in
    yellow, the rest tinted magenta) and the GLS box (red), each with the object box; the caption is
    `title` and the colours. images (B, 3, H, W) in [0, 1]; boxes and gls (B, 4) as (x0, y0, x1, y1)
    with exclusive ends."""
    scale = max(1, 128 // images.shape[-1])
    columns = [images, kept_overlay(images, keep_idx, patch_size), images]
    caption = f"{title}: object box green,\nkept yellow (dropped magenta), GLS box red"
    side, pad, head = images.shape[-1] * scale, 4, _caption_height(caption)
    sheet = Image.new("RGB", (3 * (side + pad) + pad, len(images) * (side + pad) + pad + head), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), caption, fill="black")

    def rectangle(box: Tensor, left: int, top: int, colour: tuple[int, int, int], width: int = 2) -> None:
        x0, y0, x1, y1 = (round(float(v) * scale) for v in box)
        draw.rectangle([left + x0, top + y0, left + x1 - 1, top + y1 - 1], outline=colour, width=width)

    for row in range(len(images)):
        top = head + pad + row * (side + pad)
        for col, pictures in enumerate(columns):
            left = pad + col * (side + pad)
            sheet.paste(_to_pil(pictures[row], scale), (left, top))
        grid = images.shape[-1] // patch_size
        for idx in keep_idx[row].tolist():
            r, c = divmod(idx, grid)
            cell = torch.tensor([c, r, c + 1, r + 1]) * patch_size
            rectangle(cell, pad + side + pad, top, KEPT, width=1)
        rectangle(gls[row], pad + 2 * (side + pad), top, GLS_BOX)
        for col in range(3):  # the object box last, on top
            rectangle(boxes[row], pad + col * (side + pad), top, OBJECT_BOX)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
