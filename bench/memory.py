"""Peak memory of one LoDisc training step (zero_fill, drop_tokens) against MoCo v3.

Each (model, variant) runs in a fresh subprocess that builds LoDisc and AdamW, then measures the
first training step (forward, backward, AdamW step, EMA update) on random (B, 3, S, S) views:
- CUDA: "peak" is torch.cuda.max_memory_allocated during the step, "after build" is
  memory_allocated before it (weights of both encoders and heads, and the input batch).
- CPU (Linux): "peak" is the peak RSS of the step (resource.getrusage ru_maxrss, after resetting
  the high-water mark with /proc/self/clear_refs so that building does not count), "after build"
  the RSS before it; both include the Python and torch runtime.
"step" = peak − after build: activations, gradients, AdamW's state (created by the first step,
the same for every variant) and temporaries. "model" is what building LoDisc added. Ratios are
to MoCo v3 (`method.local.weight: 0`) with the same backbone and batch.

    python bench/memory.py [--models vit_tiny_patch16_224,vit_small_patch16_224] [--batch 16] [--img-size 224]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys

import torch
from common import (
    VARIANTS,
    build,
    machine,
    markdown_table,
    pick_device,
    synchronize,
    train_step,
    two_views,
    with_local,
)

from sslfg.schema import ModelConfig

MB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, which ru_maxrss reports
            f.write("5")


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(model_name: str, variant: str, args: argparse.Namespace) -> dict[str, int]:
    """The child's work: what building added, memory after building, and the step's peak (bytes)."""
    device = pick_device(args.device)
    cfg = ModelConfig(name=model_name)
    x1, x2 = two_views(args.batch, args.img_size, device)
    gc.collect()
    base = memory_now(device)
    model, optimizer = build(cfg, args.img_size, device, method=with_local(None, **VARIANTS[variant]))
    gc.collect()
    synchronize(device)
    reset_peak(device)
    after_build = memory_now(device)
    train_step(model, optimizer, x1, x2, args.amp)
    synchronize(device)
    return {"model": after_build - base, "after_build": after_build, "peak": peak(device)}


def run_child(model_name: str, variant: str, args: argparse.Namespace) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--child", f"{model_name}|{variant}", "--batch", str(args.batch)]
    cmd += ["--img-size", str(args.img_size), "--device", args.device, "--amp", args.amp]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_tiny_patch16_224,vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16, help="images per view")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda ...")
    parser.add_argument("--amp", choices=["no", "bf16"], default="no")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child.split("|"), args)))
        return

    device = pick_device(args.device)
    kind = "CUDA max_memory_allocated" if device.type == "cuda" else "CPU peak RSS"
    print(
        f"### Memory of one training step ({kind}), {args.img_size} px, batch {args.batch} per view, "
        f"amp {args.amp}, {machine(device)}\n"
    )
    rows = []
    for model_name in args.models.split(","):
        results = {variant: run_child(model_name, variant, args) for variant in VARIANTS}
        steps = {variant: r["peak"] - r["after_build"] for variant, r in results.items()}
        for variant, r in results.items():
            mb = [f"{r[key] / MB:.0f}" for key in ("model", "after_build", "peak")]
            ratios = [f"{steps[variant] / steps['MoCo v3']:.2f}", f"{r['peak'] / results['MoCo v3']['peak']:.2f}"]
            rows.append([model_name, variant, *mb, f"{steps[variant] / MB:.0f}", *ratios])
    header = [
        "model",
        "variant",
        "model MB",
        "after build MB",
        "peak MB",
        "step MB",
        "step / MoCo v3",
        "peak / MoCo v3",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
