"""Cost of ILA (METHODS §3) against a linear probe and full fine-tuning, ViT-B/16 geometry.

Five settings on the same randomly initialised `vit_base_patch16_224` geometry (built by
`create_vit` with `img_size` S, nothing downloaded), each with a zero-initialised Linear head
(`ViTClassifier`, 200 classes):
- linear probe: the backbone frozen, only the head trains;
- full fine-tune: everything trains (the baseline of every ratio);
- ila / ila+ / ila++: `attach_ila(vit, variant)` (backbone frozen but the CLS token; adapters
  and head train).

Per setting and image size it reports
- trainable and total parameters (`count_parameters`);
- tokens after the blocks: the down-sampling adapters shrink the grid G → G−2 → G−4;
- forward GFLOPs per image and GFLOPs of one training step (forward + backward), both counted by
  `torch.utils.flop_counter.FlopCounterMode` at batch 1 (multiply and add counted apart). It
  counts matmuls and convolutions exactly and nothing else (norms, GELU, softmax, adds are
  left out); it does not see CPU's fused attention kernel, so attention runs its explicit path
  (`fused_attn = False`) while counting;
- the measured time of one training step (forward, cross-entropy with label smoothing 0.1,
  backward, SGD step with momentum 0.9; lr 1e-3, which keeps random weights finite and does not
  change the cost) on random images, interleaved rounds (ABC CBA ...), median (min–max), and the
  median of per-round ratios to full fine-tuning.

    python bench/ila.py                                   # 224 at batch 2, 448 at batch 1
    python bench/ila.py --skip-time 448                   # 448: parameters and FLOPs only
    python bench/ila.py --batch 32 --repeats 20 --amp bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from common import autocast, interleaved, machine, markdown_table, median_spread, paired_ratios, pick_device
from timm.models.vision_transformer import Attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sslfg.models.glsim import ViTClassifier, classification_loss
from sslfg.models.ila import VARIANTS, attach_ila, count_parameters, final_grid
from sslfg.weights import create_vit

MODEL = "vit_base_patch16_224"
NUM_CLASSES = 200
BASE = "full fine-tune"
SETTINGS = ("linear probe", BASE, *VARIANTS)


def build(setting: str, image_size: int, device: torch.device, seed: int = 0) -> ViTClassifier:
    """The classifier of one setting in training mode; the same seed gives every setting the same backbone."""
    torch.manual_seed(seed)
    vit = create_vit(MODEL, {"img_size": image_size})
    if setting == "linear probe":
        vit.requires_grad_(False)
    elif setting != BASE:
        attach_ila(vit, setting)
    return ViTClassifier(vit, NUM_CLASSES).to(device).train()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: str) -> None:
    """Forward, cross-entropy, backward, SGD step."""
    with autocast(x.device, amp):
        logits = model(x)
    classification_loss(logits, y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_flops(model: ViTClassifier, image_size: int, device: torch.device) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one image, attention on its explicit (counted) path."""
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    fused = [m.fused_attn for m in attention]
    for m in attention:
        m.fused_attn = False
    x = torch.randn(1, 3, image_size, image_size, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            loss = classification_loss(model(x), y)
            forward = counter.get_total_flops()
            loss.backward()
        return forward, counter.get_total_flops()
    finally:
        model.zero_grad(set_to_none=True)
        for m, was_fused in zip(attention, fused, strict=True):
            m.fused_attn = was_fused


def bench_size(image_size: int, batch: int, timed: bool, args: argparse.Namespace) -> str:
    device = pick_device(args.device)
    models = {name: build(name, image_size, device) for name in SETTINGS}
    flops = {name: count_flops(model, image_size, device) for name, model in models.items()}
    times: dict[str, list[float]] = {}
    if timed:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
        optimizers = {name: sgd(model) for name, model in models.items()}
        fns: dict[str, Callable[[], object]] = {
            name: (lambda m=model, o=optimizers[name]: train_step(m, o, x, y, args.amp))
            for name, model in models.items()
        }
        times = interleaved(fns, args.repeats, args.warmup, device)

    base_fwd, base_step = flops[BASE]
    lines = [f"### {image_size} px", ""]
    if timed:
        lines.append(
            f"{MODEL} geometry, img_size {image_size}, {NUM_CLASSES} classes, batch {batch}, amp {args.amp}, "
            f"{machine(device)}, {args.repeats} rounds after {args.warmup} warm-up"
        )
    else:
        lines.append(f"{MODEL} geometry, img_size {image_size}, {NUM_CLASSES} classes; step time not measured")
    lines.append("")
    header = [
        "setting",
        "trainable params",
        "total params",
        "tokens after blocks",
        "fwd GFLOPs/img",
        "fwd / full",
        "step GFLOPs/img (fwd+bwd)",
        "step / full",
    ]
    if timed:
        header += ["ms/step", "time / full"]
    rows = []
    for name, model in models.items():
        trainable, total = count_parameters(model)
        fwd, step = flops[name]
        row: list[object] = [
            name,
            f"{trainable:,} ({100 * trainable / total:.2f} %)",
            f"{total:,}",
            final_grid(model.encoder) ** 2 + 1,
            f"{fwd / 1e9:.2f}",
            f"{fwd / base_fwd:.3f}",
            f"{step / 1e9:.2f}",
            f"{step / base_step:.3f}",
        ]
        if timed:
            ms = [1000 * t for t in times[name]]
            ratio = "1" if name == BASE else median_spread(paired_ratios(times, name, BASE))
            row += [median_spread(ms, "{:.0f}"), ratio]
        rows.append(row)
    lines += [markdown_table(header, rows), ""]
    if timed:
        med = {name: statistics.median(ts) for name, ts in times.items()}
        lines.append(
            "- time / FLOPs per step, relative to full fine-tune: "
            + ", ".join(f"{name} {(med[name] / med[BASE]) / (flops[name][1] / base_step):.2f}" for name in SETTINGS)
        )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="image sizes (patch 16)")
    parser.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=[],
        help="images per step: one value, or one per size; default 2 up to 224 px, 1 above",
    )
    parser.add_argument("--skip-time", type=int, nargs="*", default=[], help="sizes reported without step time")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=["no", "bf16"], default="no")
    args = parser.parse_args()
    if len(args.batch) not in (0, 1, len(args.sizes)):
        parser.error(f"--batch takes one value or one per size ({len(args.sizes)})")
    if not args.batch:
        batches = [2 if size <= 224 else 1 for size in args.sizes]
    else:
        batches = args.batch * len(args.sizes) if len(args.batch) == 1 else args.batch
    for size, batch in zip(args.sizes, batches, strict=True):
        print(bench_size(size, batch, size not in args.skip_time, args), flush=True)


if __name__ == "__main__":
    main()
