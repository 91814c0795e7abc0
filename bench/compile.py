"""What does `train.compile: true` buy? ms per LoDisc training step, eager against the online encoder's blocks
compiled by torch.compile (what `sslfg.pretrain` does with `train.compile`, via `sslfg.engine.loop.compile_modules`),
and the one-off compile time.

Both models start from the same weights and take the same random batch; the timed step is
`common.train_step` (forward, backward, AdamW, EMA). The compile time is the first compiled step minus an
eager one. Rounds are interleaved (eager, compiled, compiled, eager, ...) and the table gives the median
ratio compiled/eager over rounds (min–max).

Without `--model` it runs the sample recipe's model (configs/pretrain/sample.yaml: 28 px, patch 4,
embed 128, depth 4) at its batch of 128, LoDisc zero_fill. On a GPU:

    python bench/compile.py
    python bench/compile.py --model vit_small_patch16_224 --img-size 224 --batch 128 --amp bf16 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from common import (
    build,
    interleaved,
    machine,
    markdown_table,
    median_spread,
    paired_ratios,
    pick_device,
    sample_config,
    synchronize,
    train_step,
    two_views,
)

from sslfg.engine.loop import compile_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="timm ViT name; unset: the sample recipe's model")
    parser.add_argument("--img-size", type=int, default=224, help="with --model")
    parser.add_argument("--batch", type=int, default=0, help="0: 128 (the sample recipe's), else this")
    parser.add_argument("--amp", choices=["no", "bf16"], default="no")
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (after compiling)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    args = parser.parse_args()

    device = pick_device(args.device)
    cfg = sample_config()
    model_cfg, size = cfg.model, cfg.data.image_size
    if args.model:
        model_cfg = dataclasses.replace(model_cfg, name=args.model, patch_size=0, kwargs={})
        size = args.img_size
    batch = args.batch or 128
    x1, x2 = two_views(batch, size, device)

    eager, eager_opt = build(model_cfg, size, device, method=cfg.method)
    compiled, compiled_opt = build(model_cfg, size, device, method=cfg.method)
    compile_modules(compiled.encoder.blocks, device)

    def timed(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        synchronize(device)
        tic = time.perf_counter()
        train_step(model, optimizer, x1, x2, args.amp)
        synchronize(device)
        return time.perf_counter() - tic

    first_compiled, first_eager = timed(compiled, compiled_opt), timed(eager, eager_opt)
    times = interleaved({"eager": lambda: train_step(eager, eager_opt, x1, x2, args.amp),
                         "compiled": lambda: train_step(compiled, compiled_opt, x1, x2, args.amp)},
                        args.repeats, args.warmup, device)
    ratio = paired_ratios(times, "compiled", "eager")
    print(machine(device))
    print(f"{model_cfg.name} {model_cfg.kwargs or ''} at {size} px, batch {batch}, amp {args.amp}, "
          f"{args.repeats} rounds\n")
    print(markdown_table(
        ["eager ms/step", "compiled ms/step", "compiled / eager", "compile time (s)"],
        [[median_spread([t * 1e3 for t in times["eager"]], "{:.0f}"),
          median_spread([t * 1e3 for t in times["compiled"]], "{:.0f}"),
          median_spread(ratio), f"{first_compiled - first_eager:.1f}"]]))


if __name__ == "__main__":
    main()
