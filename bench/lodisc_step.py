"""Time of one LoDisc training step against MoCo v3, and where the extra time goes.

A step is what the training loop does per batch: LoDisc forward, backward, AdamW step and one EMA
update (`update_momentum(0.99)`). Three variants share backbone, heads, initial weights and batch
(random tensors): MoCo v3 (`method.local.weight: 0`), LoDisc `zero_fill` and LoDisc `drop_tokens`.
Alongside, the parts that differ between them are timed on the same 2B images: the online encoder
forward + backward, the momentum pass with fused attention (MoCo v3), the momentum pass that reads
the attention maps and picks the kept patches (LoDisc), and each local view's masked pass.

Every round runs each step and part once, in alternating order (ABC CBA ...); the tables give
medians over rounds with (min–max), and the ratios are medians of per-round ratios.

    python bench/lodisc_step.py                        # the two CPU setups below
    python bench/lodisc_step.py --model vit_base_patch16_224 --img-size 224 --batch 64 --amp bf16

Default setups (no --model): vit_tiny geometry at 64 px with patch 8 (N = 64 patches), batch 32,
and the sample recipe's model (configs/pretrain/sample.yaml: 28 px, patch 4, embed 128, depth 4)
at its batch of 128.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from common import (
    VARIANTS,
    autocast,
    build_variants,
    interleaved,
    machine,
    markdown_table,
    median_spread,
    paired_ratios,
    pick_device,
    sample_config,
    train_step,
    two_views,
)

from sslfg.method_config import MethodConfig
from sslfg.methods import MomentumMethod
from sslfg.methods.local import zero_fill
from sslfg.models.backbone import forward_tokens
from sslfg.schema import ModelConfig

BASE = "MoCo v3"
TARGETS = {"LoDisc zero_fill": 1.3, "LoDisc drop_tokens": 1.15}


def parts(model: MomentumMethod, x: torch.Tensor, amp: str) -> dict[str, Callable[[], object]]:
    """The pieces of a step that the variants do differently, on x (2B, 3, S, S)."""
    enc, mom = model.encoder, model.momentum_encoder
    with torch.no_grad(), autocast(x.device, amp):
        keep = model.kept_patches(x)

    def online() -> None:
        with autocast(x.device, amp):
            out = forward_tokens(enc, x)[:, 0].float().sum()
        out.backward()
        enc.zero_grad(set_to_none=True)

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad(), autocast(x.device, amp):
                return fn()

        return run

    return {
        "online encoder fwd+bwd": online,
        "momentum pass, fused (MoCo v3)": no_grad(lambda: forward_tokens(mom, x)),
        "momentum pass + attention + top-k (LoDisc)": no_grad(lambda: model.kept_patches(x)),
        "local pass zero_fill": no_grad(lambda: forward_tokens(mom, zero_fill(x, keep, model.patch_size))),
        "local pass drop_tokens": no_grad(lambda: forward_tokens(mom, x, keep_idx=keep)),
    }


def bench_setup(title: str, cfg: ModelConfig, image_size: int, batch: int, args: argparse.Namespace,
                method: MethodConfig | None = None) -> str:
    device = pick_device(args.device)
    models = build_variants(cfg, image_size, device, method)
    x1, x2 = two_views(batch, image_size, device)
    fns: dict[str, Callable[[], object]] = {
        name: (lambda m=model, o=opt: train_step(m, o, x1, x2, args.amp)) for name, (model, opt) in models.items()
    }
    part_fns = parts(models["LoDisc zero_fill"][0], torch.cat([x1, x2]), args.amp)
    times = interleaved({**fns, **part_fns}, args.repeats, args.warmup, device)

    ms = {name: [1000 * t for t in ts] for name, ts in times.items()}
    base = statistics.median(ms[BASE])
    m0 = models[BASE][0]
    n = m0.encoder.patch_embed.num_patches
    lines = [
        f"### {title}",
        "",
        f"{cfg.name} {m0.timm_kwargs}, N = {n} patches, keep {models['LoDisc zero_fill'][0].local.cfg.keep_ratio}, "
        f"batch {batch} (2B = {2 * batch} images per pass), amp {args.amp}, {machine(device)}, "
        f"{args.repeats} rounds after {args.warmup} warm-up",
        "",
    ]
    rows = []
    for name in VARIANTS:
        ratio = "1" if name == BASE else median_spread(paired_ratios(times, name, BASE))
        target = f"≤ {TARGETS[name]}" if name in TARGETS else ""
        rows.append([name, median_spread(ms[name], "{:.1f}"), ratio, target])
    lines += [markdown_table(["variant", "ms/step", f"ratio to {BASE}", "target"], rows), ""]
    rows = [
        [name, median_spread(ms[name], "{:.1f}"), f"{100 * statistics.median(ms[name]) / base:.0f} %"]
        for name in part_fns
    ]
    lines += [markdown_table(["part (2B images)", "ms", f"of a {BASE} step"], rows), ""]
    med = {name: statistics.median(v) for name, v in ms.items()}
    online, fused = med["online encoder fwd+bwd"], med["momentum pass, fused (MoCo v3)"]
    lines.append(
        f"- {BASE} step {base:.1f} ms = {online:.1f} (online encoder fwd+bwd) + {fused:.1f} (momentum pass) + "
        f"{base - online - fused:.1f} (heads, loss, AdamW, EMA)"
    )
    read_attn = med["momentum pass + attention + top-k (LoDisc)"] - fused
    for view in ("zero_fill", "drop_tokens"):
        extra, local = med[f"LoDisc {view}"] - base, med[f"local pass {view}"]
        lines.append(
            f"- {view}: {extra:.1f} ms/step more than {BASE}; the parts account for {read_attn + local:.1f} = "
            f"{read_attn:.1f} (reading attention) + {local:.1f} (local pass); the rest: local heads and loss, noise"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="timm ViT name; unset: the two default CPU setups")
    parser.add_argument("--img-size", type=int, default=224, help="with --model")
    parser.add_argument("--patch-size", type=int, default=0, help="with --model; 0: the timm default")
    parser.add_argument("--batch", type=int, default=64, help="with --model: images per view")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=["no", "bf16"], default="no")
    args = parser.parse_args()

    if args.model:
        setups = [(args.model, ModelConfig(name=args.model, patch_size=args.patch_size), args.img_size, args.batch,
                   None)]
    else:
        sample = sample_config()
        setups = [
            ("vit_tiny geometry, 64 px, patch 8", ModelConfig(name="vit_tiny_patch16_224", patch_size=8), 64, 32, None),
            ("sample recipe model", sample.model, sample.data.image_size, sample.train.batch_size, sample.method),
        ]
    for title, cfg, image_size, batch, method in setups:
        print(bench_setup(title, cfg, image_size, batch, args, method), flush=True)


if __name__ == "__main__":
    main()
