"""Per-step schedules (DINO style): precomputed arrays indexed by the global optimizer step, so
resuming and plotting are exact and no scheduler object has to be stepped or saved."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warmup from `warmup_start` to `base` over `warmup_steps`, then a half cosine from
    `base` to `final` over the remaining steps; float64, length `total_steps`."""
    if total_steps <= 0:
        raise ValueError(f"a schedule needs at least one step, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine])
