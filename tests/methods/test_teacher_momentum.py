"""The teacher's EMA start as a half-life in steps (`method.teacher_half_life`): m0 = 2^(-1/h), and a teacher
that leaves its random init within a short run, which the default momentum does not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sslfg.methods import METHODS, MomentumMethod
from sslfg.pretrain import pretrain
from tests.conftest import tiny_config, tiny_method


@pytest.mark.parametrize("half_life", [1.0, 10.0, 69.0])
def test_half_life_sets_the_start_of_the_cosine(half_life: float) -> None:
    method = tiny_method("byol", **{"method.teacher_half_life": half_life})
    momentum = method.schedules(total_steps=50, per_epoch=10)["momentum"]
    assert momentum[0] == pytest.approx(math.exp(-math.log(2) / half_life), abs=1e-12)
    # after h steps at m0 the teacher's past weighs one half
    assert momentum[0] ** half_life == pytest.approx(0.5, abs=1e-12)
    assert momentum[-1] == pytest.approx(1.0, abs=0.01) and np.all(np.diff(momentum) >= 0)
    assert tiny_method("byol").schedules(50, 10)["momentum"][0] == 0.99  # 0: method.<name>.momentum


def _teacher_distances(half_life: float, steps: int = 20) -> tuple[float, float]:
    """Distances of the teacher encoder from its init and from the student after a run of `steps` EMA updates
    along the run's schedule, the student having moved to other weights at the first step."""
    method = tiny_method("mocov3", **{"method.teacher_half_life": half_life})
    init = torch.nn.utils.parameters_to_vector(method.momentum_encoder.parameters()).clone()
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    for m in method.schedules(steps, steps)["momentum"]:
        method.update_momentum(float(m))
    teacher = torch.nn.utils.parameters_to_vector(method.momentum_encoder.parameters()).detach()
    student = torch.nn.utils.parameters_to_vector(method.encoder.parameters()).detach()
    return float((teacher - init).norm()), float((teacher - student).norm())


def test_a_short_half_life_lets_the_teacher_leave_its_init() -> None:
    # the teacher = share·init + (1 − share)·student, share = ∏ m over the run
    from_init, from_student = _teacher_distances(half_life=2.0)
    assert from_student < 0.05 * from_init  # the teacher has become the student
    from_init, from_student = _teacher_distances(half_life=0.0)  # m0 0.99 cosine to 1 over 20 steps
    assert from_init < 0.15 * from_student  # the teacher is still mostly its init


def test_summary_records_the_share_the_init_keeps(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run")  # 2 epochs of 3 steps, every step logged
    cfg.method.teacher_half_life = 2.0
    run = pretrain(cfg)
    summary = json.loads((run / "summary.json").read_text())
    logged = [json.loads(line)["momentum"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and logged[0] == pytest.approx(0.5 ** 0.5)
    assert summary["teacher.momentum_start"] == pytest.approx(0.5 ** 0.5)
    assert summary["teacher.init_share"] == pytest.approx(float(np.prod(logged)), rel=1e-6)
    assert summary["teacher.init_share"] < 0.5


@pytest.mark.parametrize("name", sorted(n for n, cls in METHODS.items() if issubclass(cls, MomentumMethod)))
def test_teacher_has_no_drop_path_or_dropout(name: str) -> None:
    # DINO's drop path 0.1 and LoDisc's projector Dropout 0.2 stay on the student; two teacher passes over one
    # input are equal (else the targets, the attention and the kept patches are samples)
    dotted = {"model.drop_path_rate": 0.5, "method.mocov3.projector_dropout": 0.5}
    method = tiny_method(name, **dotted)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cls1, maps1 = method.teacher_cls(x, attention=True)
    cls2, maps2 = method.teacher_cls(x, attention=True)
    assert torch.equal(cls1, cls2) and all(torch.equal(a, b) for a, b in zip(maps1, maps2, strict=True))
    both = torch.cat([cls1, cls1])
    assert torch.equal(method.teacher_outputs(both)[0], method.teacher_outputs(both)[0])
    torch.manual_seed(1)
    s1 = method.student(x, x)
    assert not torch.equal(s1[0], s1[1])  # the student still drops paths (same input, other noise)
