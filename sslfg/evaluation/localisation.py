"""Where the methods look: LoDisc's kept patches and GLSim's box against the object box (issue 13).

Object boxes are (x0, y0, x1, y1) in the pixels of the image the model sees, x1 and y1 exclusive
(sslfg.data.boxes); GLSim's boxes are (y0, x0, y1, x1) as sslfg.models.glsim makes them.

- keep precision: the fraction of kept patches whose centre lies inside the object box;
- chance: the fraction of all patches whose centre lies inside, what a random choice of patches
  scores on average; lift = mean precision / mean chance (1: no better than chance);
- GLS IoU: intersection over union of the GLS box and the object box; coverage: the fraction of
  the object box inside the GLS box (the object the crop keeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.data import DataLoader

from sslfg.config import ConfigError
from sslfg.data.boxes import eval_boxes, transform_box
from sslfg.data.transforms import denormalize
from sslfg.evaluation.run import PIXELS, EvalDatasets, skipped_images
from sslfg.figures import save_localisation_figure
from sslfg.methods.local import keep_indices
from sslfg.models.backbone import cls_attention, forward_tokens, grid_size
from sslfg.models.glsim import GLSim, gls_boxes
from sslfg.schema import EvalConfig


def centres_inside(boxes: Tensor, grid: int, patch_size: float) -> Tensor:
    """(B, N) bool: whether the centre of patch n (row-major on a grid × grid map) lies in box b."""
    centres = (torch.arange(grid, dtype=torch.float32, device=boxes.device) + 0.5) * patch_size
    y, x = (c.reshape(-1) for c in torch.meshgrid(centres, centres, indexing="ij"))
    x0, y0, x1, y1 = (v[:, None] for v in boxes.float().unbind(1))
    return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)


def keep_precision(keep_idx: Tensor, boxes: Tensor, grid: int, patch_size: float) -> Tensor:
    """(B,) the fraction of the kept patches keep_idx (B, K) whose centre lies inside each box."""
    return centres_inside(boxes, grid, patch_size).gather(1, keep_idx).float().mean(1)


def chance_level(boxes: Tensor, grid: int, patch_size: float) -> Tensor:
    """(B,) the fraction of all patches whose centre lies inside each box."""
    return centres_inside(boxes, grid, patch_size).float().mean(1)


def yxyx_to_xyxy(boxes: Tensor) -> Tensor:
    """GLSim's (y0, x0, y1, x1) boxes as (x0, y0, x1, y1)."""
    return boxes[:, [1, 0, 3, 2]]


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    top_left, bottom_right = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    return _area(torch.cat([top_left, bottom_right], dim=1))


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(B,) intersection over union of paired (x0, y0, x1, y1) boxes."""
    a, b = a.float(), b.float()
    inter = _intersection(a, b)
    return inter / (_area(a) + _area(b) - inter)


def box_coverage(objects: Tensor, crops: Tensor) -> Tensor:
    """(B,) the fraction of each object box's area inside its crop box, both (x0, y0, x1, y1)."""
    objects, crops = objects.float(), crops.float()
    return _intersection(objects, crops) / _area(objects)


def keep_metrics(keep_idx: Tensor, boxes: Tensor, grid: int, patch_size: float, prefix: str = "loc.") -> dict:
    """Mean keep precision, chance and their ratio over the images."""
    precision = keep_precision(keep_idx, boxes, grid, patch_size).mean().item()
    chance = chance_level(boxes, grid, patch_size).mean().item()
    return {f"{prefix}keep_precision": precision, f"{prefix}keep_chance": chance,
            f"{prefix}keep_lift": precision / chance if chance > 0 else float("nan")}


def gls_metrics(gls_xyxy: Tensor, boxes: Tensor, prefix: str = "loc.") -> dict:
    """Mean IoU of the GLS boxes with the object boxes and mean object coverage."""
    return {f"{prefix}gls_iou": box_iou(gls_xyxy, boxes).mean().item(),
            f"{prefix}gls_coverage": box_coverage(boxes, gls_xyxy).mean().item()}


@torch.no_grad()
def backbone_looks(vit: VisionTransformer, images: Tensor, keep_ratio: float, top_k: int,
                   attention_layers: int = 0) -> tuple[Tensor, Tensor]:
    """One frozen forward: the patches LoDisc would keep (B, K), from the backbone's own CLS attention
    (the last `attention_layers` blocks, 0: all), and the GLS box (B, 4) as (x0, y0, x1, y1)."""
    with cls_attention(vit) as maps:
        tokens = forward_tokens(vit, images)
    maps = maps[-attention_layers:] if attention_layers else maps
    patch_size = images.shape[-1] // grid_size(vit)
    gls = gls_boxes(tokens, patch_size, top_k, num_prefix_tokens=vit.num_prefix_tokens)
    return keep_indices(torch.stack(maps), keep_ratio), yxyx_to_xyxy(gls)


def needs_attention(cfg: EvalConfig, datasets: dict[str, Any]) -> None:
    """Refused at start-up (--check too): raw pixels have no attention to rank patches by, and a test split
    without object boxes nothing to score against."""
    if cfg.features.kind == PIXELS:
        raise ConfigError("features.kind: pixels has no attention to keep patches by; eval.localise needs a backbone "
                          "(leave features.kind at cls)")
    d = cfg.data
    if datasets[d.test_split].boxes is None:
        raise ConfigError(f"data.boxes: eval.localise needs object boxes in data.test_split '{d.test_split}' of "
                          f"{d.root}; give its csv the columns x0,y0,x1,y1 and set data.boxes=true")


def localise_backbone(cfg: EvalConfig, vit, accelerator, out: Path,
                      datasets: EvalDatasets) -> tuple[dict, dict] | None:
    """Kept patches and GLS boxes of every test image on the main process (one frozen pass each)."""
    if not accelerator.is_main_process:
        return None
    d, loc, crop = cfg.data, cfg.localise, cfg.features.crop_ratio
    dataset = datasets[d.test_split]  # with boxes (`needs_attention`)
    boxes = eval_boxes(dataset, d.image_size, crop)
    vit = vit.to(accelerator.device).eval()
    keep, gls = [], []
    for images, _ in DataLoader(dataset, batch_size=cfg.features.batch_size, num_workers=d.num_workers):
        k, g = backbone_looks(vit, images.to(accelerator.device), loc.keep_ratio, loc.top_k, loc.attention_layers)
        keep.append(k.cpu())
        gls.append(g.cpu())
    keep, gls = torch.cat(keep), torch.cat(gls)
    grid = grid_size(vit)
    patch_size = d.image_size // grid
    metrics = keep_metrics(keep, boxes, grid, patch_size) | gls_metrics(gls.float(), boxes)
    protocol = {"name": "localise", "split": d.test_split, "images": len(dataset), "crop_ratio": crop,
                "keep_ratio": loc.keep_ratio, "kept_patches": keep.shape[1], "patches": grid**2,
                "attention_layers": loc.attention_layers, "top_k": loc.top_k,
                "skipped_images": skipped_images(dataset)}
    if loc.figure_samples > 0:
        picks = torch.linspace(0, len(dataset) - 1, min(loc.figure_samples, len(dataset))).long()
        images = denormalize(torch.stack([dataset[i][0] for i in picks.tolist()]), d.mean, d.std)
        save_localisation_figure(images, boxes[picks], keep[picks], gls[picks], patch_size,
                                 out / "figures" / "localise.png", f"kept {keep.shape[1]}/{grid**2} patches")
    return metrics, protocol


def finetune_test_boxes(dataset, image_size: int, resize_ratio: float) -> Tensor:
    """(N, 4) the boxes through the fine-tuning test transform: a resize to a square of side
    round(resize_ratio·S), aspect not kept, then the centre S × S crop."""
    side = round(resize_ratio * image_size)
    out = []
    for (x0, y0, x1, y1), (width, height) in zip(dataset.boxes, dataset.sizes, strict=True):
        square = (x0 * side / width, y0 * side / height, x1 * side / width, y1 * side / height)
        out.append(transform_box(square, (side, side), image_size, image_size / side))  # its crop, scale 1
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


@torch.no_grad()
def glsim_localisation(model: GLSim, dataset, boxes: Tensor, device: torch.device, batch_size: int) -> dict:
    """GLS box IoU and object coverage of a GLSim classifier over a dataset with boxes (B, 4)."""
    was_training = model.training
    model.eval()
    gls = [model(x.to(device), return_crops=True)["boxes"].cpu() for x, _ in DataLoader(dataset, batch_size)]
    model.train(was_training)
    return gls_metrics(yxyx_to_xyxy(torch.cat(gls)).float(), boxes, prefix="test.")
