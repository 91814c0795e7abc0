"""sslfg.verdicts against hand-computed values and against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sslfg.verdicts import (
    Interval,
    paired_bootstrap,
    paired_t,
    read_correct,
    seeds_needed,
    write_correct,
)

T_975_2 = 4.302652729911275  # t(0.975, 2 degrees of freedom), from a table


def test_paired_t_by_hand_the_issue_example() -> None:
    """d = 0.4, 2.9, 5.4: mean 2.9, s = 2.5 (sum of squares 12.5 / 2 = 6.25), half width t(0.975, 2) · s / √3."""
    i = paired_t([0.4, 2.9, 5.4])
    half = T_975_2 * 2.5 / math.sqrt(3)  # 6.2104...
    assert i.mean == pytest.approx(2.9) and i.low == pytest.approx(2.9 - half) and i.high == pytest.approx(2.9 + half)
    # The old rule said yes (mean 2.9 > std 2.5); at 95 % it is undecided. Seeds the margin needs: the smallest n
    # with t(0.975, n − 1) · 2.5 / √n < 2.9: n = 5 gives 2.7764 · 2.5 / 2.236 = 3.10, n = 6 gives
    # 2.5706 · 2.5 / 2.449 = 2.62.
    assert i.verdict == "not distinguishable" and i.needed == 6
    assert i.words() == "not distinguishable at 3 seeds (the margin would need 6)"


def test_paired_t_agrees_with_scipy() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        a, b = rng.normal(0.6, 0.05, n), rng.normal(0.58, 0.05, n)
        i = paired_t(a - b)
        low, high = stats.t.interval(0.95, n - 1, loc=np.mean(a - b), scale=stats.sem(a - b))
        assert (i.low, i.high) == (pytest.approx(low), pytest.approx(high))
        p = stats.ttest_rel(a, b).pvalue  # the interval excludes 0 exactly when the two-sided p < 0.05
        assert (i.verdict != "not distinguishable") == (p < 0.05)
        assert i.verdict != "better" or np.mean(a - b) > 0


def test_the_verdict_follows_the_interval() -> None:
    assert paired_t([3.0, 3.1, 2.9]).verdict == "better"
    assert paired_t([-3.0, -3.1, -2.9]).verdict == "worse"
    assert paired_t([2.0, 2.0]).words() == "better"  # no spread: the interval is the mean itself
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(1.0, 0.0) == 2
    assert seeds_needed(0.01, 1.0) is None  # beyond 100 seeds
    assert paired_t([1.0, -1.0, 0.5]).words().startswith("not distinguishable at 3 seeds (the margin would need ")
    assert paired_t([1.0, -1.0, 0.0]).words() == "not distinguishable at 3 seeds (no margin)"
    assert paired_t([0.1, -0.1, 0.01]).words() == "not distinguishable at 3 seeds (the margin would need more than 100)"
    with pytest.raises(ValueError, match="at least 2"):
        paired_t([1.0])


def test_paired_bootstrap_by_hand() -> None:
    """Identical records: every resample's difference is 0. One image in favour of a out of 4 → mean 0.25,
    and each resample's difference is (copies of that image) / 4, so the interval lies in [0, 1]."""
    a = np.array([1, 0, 1, 1], dtype=bool)
    same = paired_bootstrap(a, a)
    assert (same.mean, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "not distinguishable")
    b = np.array([0, 0, 1, 1], dtype=bool)
    i = paired_bootstrap(a, b)
    assert i.mean == 0.25 and 0 <= i.low <= 0.25 <= i.high <= 1 and i.n == 4 and i.method == "bootstrap"
    assert i.low == 0.0  # a resample without the image happens (3/4)^4 = 32 % of the time, so the 2.5 % point is 0


def test_paired_bootstrap_matches_the_normal_approximation_on_many_images() -> None:
    """2,000 images where a is right on 100 images more than b (and both agree elsewhere): the paired
    difference has mean 0.05 and std sqrt(0.05 − 0.05²)/√N, so the interval is about 0.05 ± 1.96 · 0.00487."""
    n = 2000
    a = np.zeros(n, dtype=bool)
    a[:100] = True
    i = paired_bootstrap(a, np.zeros(n, dtype=bool))
    se = math.sqrt(0.05 * 0.95 / n)
    assert i.low == pytest.approx(0.05 - 1.96 * se, abs=0.003) and i.high == pytest.approx(0.05 + 1.96 * se, abs=0.003)
    assert i.verdict == "better" and i.words() == "better"
    with pytest.raises(ValueError, match="same test images"):
        paired_bootstrap(a, a[:-1])


def test_an_undecided_bootstrap_says_it_is_one_seed() -> None:
    assert Interval(0.01, -0.02, 0.04, 100, "bootstrap").words() == \
        "not distinguishable at 1 seed (bootstrap over the test images)"
    assert Interval(0.029, -0.0346, 0.0926, 3, "t", 6).cell() == "+2.90 [-3.46, 9.26]"


def test_per_image_records_round_trip(tmp_path) -> None:
    path = write_correct(tmp_path / "knn.correct.json", "test", {"knn.k20.top1": torch.tensor([True, False, True])})
    assert read_correct(path, "knn.k20.top1").tolist() == [True, False, True]
    assert read_correct(path, "linear.top1") is None and read_correct(tmp_path / "none.json", "x") is None
