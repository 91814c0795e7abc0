"""Time of one GLSim training step and inference forward against the plain ViT classifier.

`GLSim(vit, C)` and `ViTClassifier(vit, C)` (sslfg.models.glsim) get the same backbone: one
`create_vit(model, {"img_size": S}, drop_path_rate=0.1)` (the fine-tune default), copied, so both
start from the same weights. C = 200 classes (CUB), random images and labels.

- training step: forward in training mode, `classification_loss` (cross-entropy, label smoothing
  0.1), backward, SGD step (Nesterov, momentum 0.9, lr 0.01, the fine-tune recipe; gradient
  clipping left out), zero_grad;
- inference: one forward in eval mode under torch.no_grad, at the configured batch and at batch 1.

GLSim runs the encoder twice (image, then its crop) plus GLS selection, roi_align crop and the
one-block aggregator, so about 2× the plain ViT is expected. Every round runs each of the six
measurements once, in alternating order (ABC CBA ..., common.interleaved); the tables give
medians over rounds with (min–max), and the ratios are medians of per-round GLSim/ViT ratios.

    python bench/glsim_step.py                                     # the two CPU setups below
    python bench/glsim_step.py --model vit_base_patch16_224 --img-size 224 --batch 32 --amp bf16

Default setups (no --model): vit_tiny_patch16_224 at 224 px batch 8, vit_small_patch16_224 at
224 px batch 4. Target (from the issue): GLSim training step ≤ 2.1× the plain ViT's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from common import autocast, interleaved, machine, markdown_table, median_spread, paired_ratios, pick_device
from torch import Tensor, nn

from sslfg.models.glsim import GLSim, ViTClassifier, classification_loss
from sslfg.weights import create_vit

NUM_CLASSES = 200
TARGET_TRAIN = 2.1
MODELS = ("GLSim", "ViT")


def build(name: str, img_size: int, device: torch.device) -> dict[str, nn.Module]:
    """GLSim and the plain ViT classifier on copies of one backbone."""
    torch.manual_seed(0)
    vit = create_vit(name, {"img_size": img_size}, drop_path_rate=0.1)
    return {
        "GLSim": GLSim(copy.deepcopy(vit), NUM_CLASSES).to(device),
        "ViT": ViTClassifier(vit, NUM_CLASSES).to(device),
    }


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, amp: str) -> None:
    """Forward, label-smoothed cross-entropy, backward, SGD step."""
    model.train()
    with autocast(x.device, amp):
        loss = classification_loss(model(x).float(), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def infer(model: nn.Module, x: Tensor, amp: str) -> None:
    """One forward in eval mode without gradients."""
    model.eval()
    with torch.no_grad(), autocast(x.device, amp):
        model(x)


def bench_setup(name: str, img_size: int, batch: int, args: argparse.Namespace) -> str:
    device = pick_device(args.device)
    models = build(name, img_size, device)
    optimizers = {
        m: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.0)
        for m, model in models.items()
    }
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    x1 = x[:1].clone()

    kinds = {
        "train": f"training step, batch {batch}",
        "infer": f"inference, batch {batch}",
        "infer1": "inference, batch 1",
    }
    fns: dict[str, Callable[[], object]] = {}
    for m, model in models.items():
        fns[f"{m} train"] = lambda model=model, opt=optimizers[m]: train_step(model, opt, x, y, args.amp)
        fns[f"{m} infer"] = lambda model=model: infer(model, x, args.amp)
        fns[f"{m} infer1"] = lambda model=model: infer(model, x1, args.amp)
    times = interleaved(fns, args.repeats, args.warmup, device)
    ms = {key: [1000 * t for t in ts] for key, ts in times.items()}

    rows = []
    for kind, label in kinds.items():
        images = 1 if kind == "infer1" else batch
        ips = {m: images / statistics.median(times[f"{m} {kind}"]) for m in MODELS}
        ratio = paired_ratios(times, f"GLSim {kind}", f"ViT {kind}")
        target = f"≤ {TARGET_TRAIN}" if kind == "train" else ""
        rows.append(
            [
                label,
                median_spread(ms[f"ViT {kind}"], "{:.1f}"),
                median_spread(ms[f"GLSim {kind}"], "{:.1f}"),
                median_spread(ratio),
                target,
                f"{ips['ViT']:.1f}",
                f"{ips['GLSim']:.1f}",
            ]
        )
    params = {m: sum(p.numel() for p in model.parameters()) / 1e6 for m, model in models.items()}
    lines = [
        f"### {name}, {img_size} px, batch {batch}",
        "",
        f"{NUM_CLASSES} classes, parameters: ViT {params['ViT']:.2f} M, GLSim {params['GLSim']:.2f} M; amp {args.amp}, "
        f"{machine(device)}, {args.repeats} rounds after {args.warmup} warm-up",
        "",
        markdown_table(
            ["measurement", "ViT ms", "GLSim ms", "GLSim / ViT", "target", "ViT images/s", "GLSim images/s"], rows
        ),
        "",
    ]
    train_ratio = statistics.median(paired_ratios(times, "GLSim train", "ViT train"))
    lines.append(
        f"- training step GLSim / ViT = {train_ratio:.2f} (target ≤ {TARGET_TRAIN}): "
        f"{'met' if train_ratio <= TARGET_TRAIN else 'NOT met'}"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="timm ViT name; unset: the two default CPU setups")
    parser.add_argument("--img-size", type=int, default=224, help="with --model")
    parser.add_argument("--batch", type=int, default=8, help="with --model")
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=["no", "bf16"], default="no")
    args = parser.parse_args()

    if args.model:
        setups = [(args.model, args.img_size, args.batch)]
    else:
        setups = [("vit_tiny_patch16_224", 224, 8), ("vit_small_patch16_224", 224, 4)]
    for name, img_size, batch in setups:
        print(bench_setup(name, img_size, batch, args), flush=True)


if __name__ == "__main__":
    main()
