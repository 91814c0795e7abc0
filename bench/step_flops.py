"""Throughput and model FLOPs utilisation (MFU) of one pretraining step: MoCo v3 and LoDisc (zero_fill,
drop_tokens) on one device.

A step is what the training loop does per batch (`common.train_step`: forward, backward, AdamW, EMA).
FLOPs are counted once per variant by torch's FlopCounterMode on a real step (matmuls, convolutions
and attention, forward and backward: the model FLOPs, no recomputation); MFU = FLOPs per step /
seconds per step / the GPU's dense bf16 peak, looked up from its name (`PEAK_TFLOPS`) or given with
--peak-tflops. images/s counts images per view (the batch), as the training loop's global batch does.

    python bench/step_flops.py --model vit_small_patch16_224 --batch 256 --device cuda --amp bf16
    python bench/step_flops.py --model vit_tiny_patch16_224 --img-size 32 --patch-size 8 --batch 4 --device cpu
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import VARIANTS, build_variants, interleaved, machine, markdown_table, pick_device, train_step, two_views
from torch.utils.flop_counter import FlopCounterMode

from sslfg.schema import ModelConfig

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first name found in
# torch.cuda.get_device_name counts (H100 PCIe before H100, which is the SXM part)
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "4090": 165.2}


def peak_tflops(device: torch.device, given: float) -> tuple[float, str]:
    """(peak, where it came from); 0 when unknown."""
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return 0.0, "no peak on CPU"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak, f"{name}: table"
    return 0.0, f"{name} is not in PEAK_TFLOPS: pass --peak-tflops for an MFU"


def step_flops(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
               amp: str) -> int:
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, x1, x2, amp)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=0, help="0: the timm default")
    parser.add_argument("--batch", type=int, default=256, help="images per view")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=["no", "bf16"], default="bf16")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak; 0: from the table")
    args = parser.parse_args()
    device = pick_device(args.device)
    cfg = ModelConfig(name=args.model, patch_size=args.patch_size)
    models = build_variants(cfg, args.img_size, device)
    x1, x2 = two_views(args.batch, args.img_size, device)
    flops = {name: step_flops(m, o, x1, x2, args.amp) for name, (m, o) in models.items()}
    times = interleaved({name: (lambda m=m, o=o: train_step(m, o, x1, x2, args.amp)) for name, (m, o) in
                         models.items()}, args.repeats, args.warmup, device)
    peak, source = peak_tflops(device, args.peak_tflops)
    rows = []
    for name in VARIANTS:
        seconds = statistics.median(times[name])
        achieved = flops[name] / seconds / 1e12
        mfu = f"{100 * achieved / peak:.1f} %" if peak else "–"
        rows.append([name, f"{1000 * seconds:.1f}", f"{args.batch / seconds:.0f}", f"{flops[name] / 1e12:.3f}",
                     f"{achieved:.1f}", mfu])
    print(f"{args.model}, {args.img_size} px, batch {args.batch} per view, amp {args.amp}, {machine(device)}; "
          f"peak {peak or '?'} TFLOP/s ({source}); median of {args.repeats} after {args.warmup} warm-up")
    print(markdown_table(["variant", "ms/step", "images/s", "TFLOP/step", "TFLOP/s", "MFU"], rows))


if __name__ == "__main__":
    main()
