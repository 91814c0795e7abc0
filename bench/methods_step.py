"""ms per training step of every method with and without LoDisc's local branch, against MoCo v3, on the
sample recipes (configs/pretrain/sample.yaml for MoCo v3, configs/pretrain/<method>_sample.yaml for the
others): their backbone, heads and batch, random tensors for the images, with the recipe's local views when it
has them (DINO's multi-crop). One step is what the loop does per batch (forward, backward, AdamW, one EMA
update); all arms are timed side by side, in interleaved rounds.

    python bench/methods_step.py                  # the sample recipes on this machine's CPU
    python bench/methods_step.py --repeats 20 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from common import (
    ROOT,
    build,
    interleaved,
    machine,
    markdown_table,
    median_spread,
    paired_ratios,
    pick_device,
    train_step,
    two_views,
    with_local,
)

from sslfg.config import load_config
from sslfg.data.transforms import local_crop_size
from sslfg.methods import METHODS
from sslfg.schema import PretrainConfig

BASE = "mocov3"


def recipe(name: str) -> PretrainConfig:
    """The sample recipe of method `name`."""
    path = ROOT / "configs" / "pretrain" / ("sample.yaml" if name == BASE else f"{name}_sample.yaml")
    return load_config(path, [], PretrainConfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--device", default="cpu", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=["no", "bf16"], default="no")
    args = parser.parse_args()
    device = pick_device(args.device)

    fns: dict[str, Callable[[], object]] = {}
    for name in METHODS:
        cfg = recipe(name)
        x1, x2 = two_views(cfg.train.batch_size, cfg.data.image_size, device)
        size = local_crop_size(cfg.data.image_size, cfg.augment)  # the recipe's multi-crop views (DINO's 8)
        crops = [two_views(cfg.train.batch_size, size, device, seed=i)[0] for i in range(cfg.augment.local_crops)]
        for local in (0.0, cfg.method.local.weight):
            arm = f"{name} + local" if local else name
            model, opt = build(cfg.model, cfg.data.image_size, device, method=with_local(cfg.method, weight=local))
            fns[arm] = lambda m=model, o=opt, a=x1, b=x2, c=crops: train_step(m, o, a, b, args.amp, c)
    times = interleaved(fns, args.repeats, args.warmup, device)
    ms = {arm: [1000 * t for t in ts] for arm, ts in times.items()}
    base = recipe(BASE)
    print(f"### ms per step, sample recipes ({base.data.image_size} px, batch {base.train.batch_size}), "
          f"amp {args.amp}, {machine(device)}, {args.repeats} rounds after {args.warmup} warm-up\n")
    rows = [[arm, median_spread(v, "{:.1f}"), "1" if arm == BASE else median_spread(paired_ratios(times, arm, BASE))]
            for arm, v in ms.items()]
    print(markdown_table(["arm", "ms/step", f"ratio to {BASE}"], rows))
    print(f"\nmedian {BASE} step: {statistics.median(ms[BASE]):.1f} ms")


if __name__ == "__main__":
    main()
