from __future__ import annotations

import math

import numpy as np
import pytest

from sslfg.engine.schedules import cosine_schedule


def test_cosine_schedule_matches_formula_with_warmup() -> None:
    s = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4, warmup_start=0.0)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    for i in range(6):
        assert s[4 + i] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * i / 6)))


def test_momentum_schedule_is_moco_v3_cosine_to_one() -> None:
    # MoCo v3: m = 1 - 0.5 (1 + cos(pi t / T)) (1 - m0)
    s = cosine_schedule(0.99, 1.0, total_steps=50)
    t = np.arange(50)
    np.testing.assert_allclose(s, 1 - 0.5 * (1 + np.cos(np.pi * t / 50)) * (1 - 0.99))
    assert s[0] == 0.99 and np.all(np.diff(s) > 0) and s[-1] < 1


def test_schedule_rejects_empty() -> None:
    with pytest.raises(ValueError, match="at least one step"):
        cosine_schedule(1.0, 0.0, 0)
