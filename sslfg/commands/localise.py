"""Where a frozen backbone looks, against the object boxes of the test split (sslfg.evaluation.localisation).

    python -m eval.localise --checkpoint runs/cluttered_lodisc   # on the run's own data (its config.yaml)
    python -m eval.localise --random-init --checkpoint runs/cluttered_lodisc   # the floor, same architecture

LoDisc keep precision: the fraction of the ⌊localise.keep_ratio·N⌋ patches with the highest location
score of the backbone's own CLS attention whose centre lies inside the object box, next to chance (the
fraction of all patches inside) and lift (their ratio); GLS box: IoU with the object box and the fraction
of the object inside it (localise.top_k patches most similar to CLS). Images go through the evaluations'
resize + centre crop (features.crop_ratio), and the boxes with them. Writes <output_dir>/localise.json
and figures/localise.png (localise.figure_samples test images). The test split needs boxes (data.boxes);
--dataset PATH evaluates on other data, e.g. configs/datasets/cluttered.yaml.
The console command `sslfg-localise` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sslfg.cli import console, run_evaluation
from sslfg.config import ConfigError
from sslfg.data.boxes import eval_boxes
from sslfg.data.datasets import build_dataset
from sslfg.data.transforms import denormalize, eval_transform
from sslfg.evaluation.localisation import backbone_looks, gls_metrics, keep_metrics
from sslfg.evaluation.run import PIXELS, skipped_images
from sslfg.figures import save_localisation_figure
from sslfg.models.backbone import grid_size
from sslfg.schema import EvalConfig
from sslfg.summary import kept_patches


def needs_attention(cfg: EvalConfig, datasets: dict[str, Any]) -> None:
    """Refused at start-up (--check too): raw pixels have no attention to rank patches by."""
    if cfg.features.kind == PIXELS:
        raise ConfigError("features.kind: pixels has no attention to keep patches by; eval.localise needs a backbone "
                          "(leave features.kind at cls)")


def localise_backbone(cfg: EvalConfig, vit, accelerator, out: Path) -> tuple[dict, dict] | None:
    """Kept patches and GLS boxes of every test image on the main process (one frozen pass each)."""
    if not accelerator.is_main_process:
        return None
    d, loc, crop = cfg.data, cfg.localise, cfg.features.crop_ratio
    dataset = build_dataset(d, d.test_split, eval_transform(d.image_size, d.mean, d.std, crop))
    if dataset.boxes is None:
        raise ConfigError(f"data.boxes: eval.localise needs object boxes in data.test_split '{d.test_split}' of "
                          f"{d.root}; give its csv the columns x0,y0,x1,y1 and set data.boxes=true")
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


def settings(cfg: EvalConfig, vit, num_processes: int, datasets: dict[str, Any]) -> dict[str, Any]:
    """The localisation settings for the start-up summary (the crop ratio is every evaluation's)."""
    loc = cfg.localise
    return {"localise.keep_ratio": loc.keep_ratio, "localise.kept_patches": kept_patches(vit, loc.keep_ratio),
            "localise.attention_layers": loc.attention_layers or "every block", "localise.top_k": loc.top_k,
            "localise.figure_samples": loc.figure_samples}


def main(argv: Sequence[str] | None = None) -> dict:
    return run_evaluation(argv, __doc__, "localise", localise_backbone, settings, needs_labels=False,
                          check_data=needs_attention, needs_vit="eval.localise (kept patches and GLS boxes)")


cli = console(main)
