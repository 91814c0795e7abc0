"""Pieces shared by the benchmarks: device choice, the three LoDisc variants, any method, one training step,
interleaved timing and markdown tables."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from sslfg.config import load_config
from sslfg.method_config import MethodConfig
from sslfg.methods import Method, build_method
from sslfg.schema import ModelConfig, PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CONFIG = ROOT / "configs" / "pretrain" / "sample.yaml"

# Same backbone and heads; only the local branch (method.local) differs. MoCo v3 is the baseline of every ratio.
VARIANTS: dict[str, dict[str, object]] = {
    "MoCo v3": {"weight": 0.0},
    "LoDisc zero_fill": {"view": "zero_fill"},
    "LoDisc drop_tokens": {"view": "drop_tokens"},
}


def with_local(method: MethodConfig | None, **local: object) -> MethodConfig:
    """`method` (default: the schema's, MoCo v3 + local) with some method.local keys replaced."""
    method = method or MethodConfig()
    return dataclasses.replace(method, local=dataclasses.replace(method.local, **local))


def sample_config() -> PretrainConfig:
    """The demo recipe (configs/pretrain/sample.yaml) as train_ssl.py loads it, data.root made absolute."""
    cfg = load_config(SAMPLE_CONFIG, [], PretrainConfig)
    cfg.data.root = str(ROOT / cfg.data.root)
    return cfg


def pick_device(name: str) -> torch.device:
    """'auto' is cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for amp == 'bf16', nothing for 'no'."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(
    cfg: ModelConfig, image_size: int, device: torch.device, seed: int = 0, method: MethodConfig | None = None
) -> tuple[Method, torch.optim.Optimizer]:
    """The method (default: the schema's, LoDisc) in training mode and an AdamW over its trainable parameters;
    same seed, same weights."""
    torch.manual_seed(seed)
    model = build_method(cfg, method or MethodConfig(), image_size).to(device).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.1)


def build_variants(
    cfg: ModelConfig, image_size: int, device: torch.device, method: MethodConfig | None = None
) -> dict[str, tuple[Method, torch.optim.Optimizer]]:
    """One (model, optimizer) per entry of VARIANTS, all with the same initial weights."""
    return {
        name: build(cfg, image_size, device, method=with_local(method, **overrides))
        for name, overrides in VARIANTS.items()
    }


def train_step(model: Method, optimizer: torch.optim.Optimizer, x1: torch.Tensor, x2: torch.Tensor,
               amp: str, local_views: Sequence[torch.Tensor] = ()) -> None:
    """Forward, backward, AdamW step and the method's after-update work (one EMA update at momentum 0.99 for a
    method with a teacher): what the training loop does per step; `local_views`: DINO's multi-crop views."""
    with autocast(x1.device, amp):
        loss = model(x1, x2, *local_views)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_update({"momentum": 0.99}, applied=True)


def two_views(batch: int, image_size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, 3, S, S) batches of normalised-looking noise."""
    g = torch.Generator().manual_seed(seed)
    x1, x2 = (torch.randn(batch, 3, image_size, image_size, generator=g) for _ in range(2))
    return x1.to(device), x2.to(device)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in rounds that run every function once.

    Odd rounds run the functions in reverse order (ABC CBA ...), so a slow drift of the machine
    falls on all of them alike. `warmup` untimed rounds come first.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else reversed(names):
            synchronize(device)
            tic = time.perf_counter()
            fns[name]()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - tic)
    return times


def paired_ratios(times: dict[str, list[float]], name: str, base: str) -> list[float]:
    """times[name][r] / times[base][r] for each round r: ratios of measurements taken side by side."""
    return [a / b for a, b in zip(times[name], times[base], strict=True)]


def median_spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """'median (min–max)'."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch intra-op threads set to n (0: leave as is) inside the context."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine(device: torch.device) -> str:
    """One line naming the device (and torch's thread count on CPU)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
