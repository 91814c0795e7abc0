"""Cost of choosing GLSim's discriminative region against attention rollout and TransFG part selection.

All four selections run on random tensors of ViT-B/16 geometry (D 768, L 12 layers, H 12 heads,
N = (S/16)² patches, T = 1 + N tokens), batch 8, float32; no model is needed:

- GLS: `sslfg.models.glsim.gls_boxes` (normalise, batched CLS·patch dot product, top-k, box) on
  the final tokens (B, T, D); "GLS scores + top-k" is `gls_scores` + `topk` alone.
- cosine: `F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1)` with broadcasting + top-k.
- rollout (Abnar & Zuidema): per layer the head-averaged attention (B, T, T) + identity,
  row-normalised, multiplied through the 12 layers (later layers on the left); top-k of the CLS
  row's patch entries. "rollout, CLS row only" gets the same top-k with vector-matrix products
  (e₀ᵀ·Ã_12···Ã_1, from the left), for comparison: the full matrix chain is not needed.
- TransFG part selection: the per-head attention matrices (B, H, T, T) multiplied through the 12
  layers, then per-head argmax over the CLS row's patch entries.

The attention maps are given (random rows on the simplex): reading them out of a ViT costs an
unfused attention path on top, which this benchmark does not count (GLS needs only the tokens).

FLOPs (multiply and add counted apart, per image):
    GLS, cosine  3·T·D (normalise T tokens) + 2·N·D (dot products)
    rollout      L·(H + 3)·T² (head mean, + I, row normalisation) + 2·(L − 1)·T³ (matrix chain)
    CLS row only L·(H + 3)·T² + 2·(L − 1)·T² (vector chain)
    TransFG      2·H·(L − 1)·T³ (per-head matrix chain)
top-k / argmax comparisons are left out. Times: each timed sample runs a selection often enough
to last `--min-time` and is divided by the count; samples are taken in interleaved rounds
(ABC CBA ..., common.interleaved); tables give medians over rounds with (min–max), ratios are
medians of per-round ratios. Alongside, one forward of the ViT-B/16 encoder
(`create_vit("vit_base_patch16_224", {"img_size": S})`, eval, no_grad, same batch) is timed, to
express the selection as a share of the encoder pass it follows.

    python bench/glsim_select.py                               # 224 and 448 (448's forward: tens of s on CPU)
    python bench/glsim_select.py --sizes 224 --skip-forward
    python bench/glsim_select.py --device cuda --amp bf16      # GPU: the forward under bf16 autocast

Targets (from the issue): rollout ≥ 100× the FLOPs of GLS; GLS ≥ 40× faster than rollout at 224
and ≥ 400× at 448; GLS under 1 % of one encoder forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import (
    autocast,
    interleaved,
    machine,
    markdown_table,
    median_spread,
    paired_ratios,
    pick_device,
    synchronize,
)
from torch import Tensor

from sslfg.models.backbone import forward_tokens
from sslfg.models.glsim import gls_boxes, gls_scores
from sslfg.weights import create_vit

DIM, DEPTH, HEADS, PATCH = 768, 12, 12, 16
VIT_B = "vit_base_patch16_224"
GLS = "GLS (gls_boxes)"
TARGET_FLOPS = 100
TARGET_SPEEDUP = {224: 40, 448: 400}
TARGET_SHARE = 0.01


def flops(n: int) -> dict[str, float]:
    """FLOPs per image of each selection for N patches (formulas in the module docstring)."""
    t = 1 + n
    gls = 3 * t * DIM + 2 * n * DIM
    return {
        GLS: gls,
        "GLS scores + top-k": gls,
        "F.cosine_similarity + top-k": gls,
        "attention rollout": DEPTH * (HEADS + 3) * t**2 + 2 * (DEPTH - 1) * t**3,
        "rollout, CLS row only": DEPTH * (HEADS + 3) * t**2 + 2 * (DEPTH - 1) * t**2,
        "TransFG part selection": 2 * HEADS * (DEPTH - 1) * t**3,
    }


def rollout(attentions: list[Tensor], k: int) -> Tensor:
    """Top-k patches (B, k) of the CLS row of the attention rollout over layers (B, H, T, T)."""
    eye = torch.eye(attentions[0].shape[-1], device=attentions[0].device)
    result = None
    for attn in attentions:
        a = attn.mean(1) + eye
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result[:, 0, 1:].topk(k, dim=1).indices


def rollout_cls_row(attentions: list[Tensor], k: int) -> Tensor:
    """The same top-k as `rollout`, from the CLS row alone: e₀ᵀ·Ã_L···Ã_1 as a chain of vector-matrix products."""
    eye = torch.eye(attentions[0].shape[-1], device=attentions[0].device)
    row = None
    for attn in reversed(attentions):
        a = attn.mean(1) + eye
        a = a / a.sum(-1, keepdim=True)
        row = a[:, 0] if row is None else torch.bmm(row.unsqueeze(1), a).squeeze(1)
    return row[:, 1:].topk(k, dim=1).indices


def transfg(attentions: list[Tensor]) -> Tensor:
    """Per-head argmax (B, H) of the CLS row of the per-head attention product, as TransFG's part selection."""
    product = attentions[0]
    for attn in attentions[1:]:
        product = attn @ product
    return product[:, :, 0, 1:].argmax(-1)


def repeated(fn: Callable[[], object], min_time: float, device: torch.device) -> tuple[Callable[[], None], int]:
    """fn run n times in a row, n the first power of two for which the run lasts at least min_time seconds; and n."""

    def run(n: int) -> float:
        synchronize(device)
        tic = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return time.perf_counter() - tic

    n = 1
    run(n)
    while run(n) < min_time:
        n *= 2
    return (lambda: run(n)), n


def time_selections(
    n: int, args: argparse.Namespace, device: torch.device
) -> tuple[list[str], dict[str, list[float]], dict[str, int]]:
    """Seconds per call of each selection in each round, and the calls per timed sample."""
    b, k, t = args.batch, args.k, 1 + n
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, t, DIM, generator=g).to(device)
    attentions = [torch.rand(b, HEADS, t, t, generator=g).to(device) for _ in range(DEPTH)]
    attentions = [a / a.sum(-1, keepdim=True) for a in attentions]
    selections: dict[str, Callable[[], object]] = {
        GLS: lambda: gls_boxes(tokens, PATCH, k),
        "GLS scores + top-k": lambda: gls_scores(tokens).topk(k, dim=1).indices,
        "F.cosine_similarity + top-k": lambda: (
            F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1).topk(k, dim=1).indices
        ),
        "attention rollout": lambda: rollout(attentions, k),
        "rollout, CLS row only": lambda: rollout_cls_row(attentions, k),
        "TransFG part selection": lambda: transfg(attentions),
    }
    with torch.no_grad():
        runs = {name: repeated(fn, args.min_time, device) for name, fn in selections.items()}
        times = interleaved({name: run for name, (run, _) in runs.items()}, args.repeats, args.warmup, device)
    calls = {name: c for name, (_, c) in runs.items()}
    return list(selections), {name: [s / calls[name] for s in ts] for name, ts in times.items()}, calls


def time_forward(size: int, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Milliseconds of each timed ViT-B/16 encoder forward at batch args.batch."""
    vit = create_vit(VIT_B, {"img_size": size}).to(device).eval()
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)

    def forward() -> None:
        with torch.no_grad(), autocast(device, args.amp):
            forward_tokens(vit, x)

    return [1000 * s for s in interleaved({"forward": forward}, args.forward_repeats, 1, device)["forward"]]


def bench_size(size: int, args: argparse.Namespace, device: torch.device) -> str:
    b, k = args.batch, args.k
    n = (size // PATCH) ** 2
    t = 1 + n
    names, times, calls = time_selections(n, args, device)
    ms = {name: [1000 * s for s in ts] for name, ts in times.items()}
    forward_ms = [] if args.skip_forward else time_forward(size, args, device)
    fwd = statistics.median(forward_ms) if forward_ms else 0.0

    fl = flops(n)
    rows = []
    for name in names:
        share = f"{100 * statistics.median(ms[name]) / fwd:.3f} %" if fwd else "–"
        rows.append(
            [
                name,
                f"{b * fl[name] / 1e6:,.2f}",
                f"{fl[name] / fl[GLS]:,.0f}",
                median_spread(ms[name], "{:.3f}"),
                median_spread(paired_ratios(times, name, GLS), "{:,.1f}"),
                calls[name],
                share,
            ]
        )
    lines = [
        f"### {size} px: N = {n} patches, T = {t} tokens, batch {b}, k {k}",
        "",
        f"ViT-B/16 geometry (D {DIM}, {DEPTH} layers, {HEADS} heads), float32 selections, {machine(device)}, "
        f"{args.repeats} rounds after {args.warmup} warm-up",
        "",
        markdown_table(
            ["selection", "MFLOPs (batch)", "FLOPs / GLS", "ms", "time / GLS", "calls per sample", "of a forward"],
            rows,
        ),
        "",
    ]
    if fwd:
        lines.append(
            f"ViT-B/16 encoder forward ({VIT_B}, img_size {size}, batch {b}, eval, no_grad, amp {args.amp}): "
            f"{median_spread(forward_ms, '{:,.1f}')} ms over {args.forward_repeats} calls after 1 warm-up"
        )
        lines.append("")
    flop_ratio = fl["attention rollout"] / fl[GLS]
    speedup = statistics.median(paired_ratios(times, "attention rollout", GLS))
    lines.append(
        f"- FLOPs: rollout {flop_ratio:,.0f}× GLS (target ≥ {TARGET_FLOPS}×): "
        f"{'met' if flop_ratio >= TARGET_FLOPS else 'NOT met'}"
    )
    if size in TARGET_SPEEDUP:
        target = TARGET_SPEEDUP[size]
        lines.append(
            f"- time: GLS {speedup:,.1f}× faster than rollout (target ≥ {target}× at {size}): "
            f"{'met' if speedup >= target else 'NOT met'}"
        )
    if fwd:
        share = statistics.median(ms[GLS]) / fwd
        lines.append(
            f"- GLS = {100 * share:.3f} % of one encoder forward (target < {100 * TARGET_SHARE:.0f} %): "
            f"{'met' if share < TARGET_SHARE else 'NOT met'}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="image sizes (patch 16)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=8, help="GLS / rollout top-k")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the selections")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--min-time", type=float, default=0.02, help="seconds a timed sample lasts at least")
    parser.add_argument("--forward-repeats", type=int, default=3, help="timed encoder forwards")
    parser.add_argument("--skip-forward", action="store_true", help="do not time the ViT-B/16 forward")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", choices=["no", "bf16"], default="no", help="autocast of the encoder forward")
    args = parser.parse_args()

    device = pick_device(args.device)
    for size in args.sizes:
        print(bench_size(size, args, device), flush=True)


if __name__ == "__main__":
    main()
