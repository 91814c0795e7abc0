"""Verdicts with confidence: is arm A better than arm B on a metric, and how sure can the study be?

- Two or more seeds: the paired differences d_i = a_i − b_i (the same seed for both arms), their mean
  and the 95 % Student t interval mean ± t(0.975, n − 1) · s / √n, s the sample std of the d_i.
- One seed: a paired bootstrap over the test images: the per-image correctness of both arms is
  resampled together (the same images for both), and the interval is the 2.5 and 97.5 percentiles of
  the resampled accuracy differences. It covers the choice of test images, not the seed.

Verdict: "better" (the interval lies above 0), "worse" (below 0), else "not distinguishable at this
number of seeds", with the seeds the observed margin would need: the smallest n with
t(0.975, n − 1) · s / √n < |mean| at the observed s.

The evaluations (eval.knn, eval.linear, eval.finetune) record which test images they got right in a
side file (`write_correct`, `read_correct`), which the one-seed bootstrap pairs by image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats
from torch import Tensor

from sslfg.files import write_json

CONFIDENCE = 0.95
RESAMPLES = 2000  # bootstrap resamples: the percentiles move by about 0.1 point between bootstrap seeds
MAX_SEEDS = 100  # seeds_needed gives up beyond this


@dataclass(frozen=True)
class Interval:
    """A mean difference and its 95 % interval, from `n` seeds (t) or `n` test images (bootstrap)."""

    mean: float
    low: float
    high: float
    n: int
    method: str  # "t" or "bootstrap"
    needed: int | None = None  # t: the seeds the observed margin would need (None: more than MAX_SEEDS)

    @property
    def verdict(self) -> str:
        return "better" if self.low > 0 else "worse" if self.high < 0 else "not distinguishable"

    def words(self) -> str:
        """The verdict, and for an undecided one the evidence it would need."""
        if self.verdict != "not distinguishable":
            return self.verdict
        if self.method == "bootstrap":
            return "not distinguishable at 1 seed (bootstrap over the test images)"
        if self.mean == 0:
            return f"not distinguishable at {self.n} seeds (no margin)"
        more = f"more than {MAX_SEEDS}" if self.needed is None else self.needed
        return f"not distinguishable at {self.n} seeds (the margin would need {more})"

    def cell(self, scale: float = 100.0) -> str:
        """'+2.90 [−3.46, 9.26]' in points (`scale` 100 for fractions)."""
        return f"{scale * self.mean:+.2f} [{scale * self.low:.2f}, {scale * self.high:.2f}]"


def half_width(s: float, n: int) -> float:
    """t(0.975, n − 1) · s / √n: half the 95 % interval of a mean of n paired differences of std s."""
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * s / math.sqrt(n)


def seeds_needed(mean: float, s: float) -> int | None:
    """The smallest n ≥ 2 whose interval at this mean and std excludes 0; None for a zero mean or beyond MAX_SEEDS."""
    if mean == 0:
        return None
    return next((n for n in range(2, MAX_SEEDS + 1) if half_width(s, n) < abs(mean)), None)


def paired_t(differences: Sequence[float]) -> Interval:
    """The t interval of the mean of n ≥ 2 paired differences."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        raise ValueError(f"a t interval needs at least 2 paired differences, got {len(d)}")
    mean, s = float(d.mean()), float(d.std(ddof=1))
    h = half_width(s, len(d))
    return Interval(mean, mean - h, mean + h, len(d), "t", seeds_needed(mean, s))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """The percentile interval of accuracy(a) − accuracy(b) over test images resampled with replacement,
    the same draw for both; a and b (N,) are the per-image correctness (bool or 0/1) of the two arms."""
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"the two arms' per-image records must cover the same test images, got {a.shape} and "
                         f"{b.shape}")
    d = a.astype(np.int8) - b.astype(np.int8)
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, len(d), (n, len(d)))].mean(1)
                            for n in np.diff(np.r_[0:resamples:200, resamples])])  # 200 resamples at a time
    low, high = np.percentile(means, [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return Interval(float(d.mean()), float(low), float(high), len(d), "bootstrap")


def correct_path(out_dir: Path, name: str) -> Path:
    """Where an evaluation named `name` (knn, linear, test) keeps its per-image record."""
    return Path(out_dir) / f"{name}.correct.json"


def write_correct(path: Path, split: str, hits: dict[str, Tensor]) -> Path:
    """{metric: (N,) bool} of one split → JSON with one '0'/'1' character per image, in dataset order."""
    strings = {key: "".join("1" if x else "0" for x in h.tolist()) for key, h in hits.items()}
    return write_json(path, {"split": split, "images": len(next(iter(strings.values()), "")), "correct": strings})


def read_correct(path: Path, key: str) -> np.ndarray | None:
    """One metric's per-image record from `write_correct`'s file; None when the file or metric is missing."""
    if not Path(path).is_file():
        return None
    bits = json.loads(Path(path).read_text())["correct"].get(key)
    return None if bits is None else np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")
