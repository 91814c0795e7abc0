"""The momentum encoder's attention read-out: time and peak memory of the pass that returns every
block's CLS attention, fused kernel + CLS row (`sslfg.models.backbone.cls_attention`) against the
explicit attention path it replaced (fused attention off, softmax read at `attn_drop`: B·H·N²
probabilities per block), and against the plain fused pass (MoCo v3, no read-out).

Each variant runs in a fresh subprocess (no_grad, eval, random images); memory is the peak RSS
above the RSS before the first pass on CPU (/proc/self/clear_refs + ru_maxrss), or
torch.cuda.max_memory_allocated above the allocation before it on CUDA. Time: median of --repeats.

    python bench/momentum_pass.py                                        # vit_small, 224 px, batch 8, CPU
    python bench/momentum_pass.py --device cuda --amp bf16 --batch 256 --img-size 448 --model vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
from common import autocast, machine, markdown_table, pick_device, synchronize

from sslfg.models.backbone import cls_attention, forward_tokens
from sslfg.weights import create_vit

VARIANTS = ("fused pass, no read-out (MoCo v3)", "fused + CLS row (cls_attention)", "explicit attention (before)")
MB = 2**20


@contextlib.contextmanager
def explicit_cls_attention(vit: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The read-out before issue 15: fused attention off, the softmax read where it passes attn_drop."""
    maps: list[torch.Tensor] = []
    handles = [blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(i[0][:, :, 0, 1:].float().mean(1)))
               for blk in vit.blocks]
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    try:
        yield maps
    finally:
        for blk, handle in zip(vit.blocks, handles, strict=True):
            blk.attn.fused_attn = True
            handle.remove()


def one_variant(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    torch.manual_seed(0)
    vit = create_vit(args.model, {"img_size": args.img_size}).to(device).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    reader = {VARIANTS[0]: lambda v: contextlib.nullcontext([]), VARIANTS[1]: cls_attention,
              VARIANTS[2]: explicit_cls_attention}[args.variant]

    def run() -> None:
        with torch.no_grad(), autocast(device, args.amp), reader(vit):
            forward_tokens(vit, x)
        synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark to the current RSS
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mb": peak / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("no", "bf16"), default="no")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args)))
        return
    rows = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append([variant, f"{r['seconds']:.3f}", f"{r['peak_mb']:.0f}"])
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, amp {args.amp}; {machine(pick_device(args.device))}")
    print(markdown_table(["momentum pass", "seconds (median)", "peak MiB above inputs"], rows))


if __name__ == "__main__":
    main()
