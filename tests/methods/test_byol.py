"""BYOL against its formulas: 2 − 2·cos between the student's prediction and the teacher's projection of the
other view, symmetric, the local term on the explicitly masked view, and its heads."""

from __future__ import annotations

import torch

from sslfg.losses import byol_loss
from sslfg.models.heads import GlobalBatchNorm1d
from tests.conftest import tiny_method
from tests.methods.references import outputs


def reference_byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """1/B Σ_b ‖p_b/‖p_b‖ − z_b/‖z_b‖‖², in float64 with plain loops (= 2 − 2·cos)."""
    total = 0.0
    for pb, zb in zip(p.double(), z.double(), strict=True):
        total += float(((pb / pb.norm() - zb / zb.norm()) ** 2).sum())
    return torch.tensor(total / len(p), dtype=torch.float64)


def test_loss_matches_formula() -> None:
    torch.manual_seed(0)
    p, z = torch.randn(6, 9), torch.randn(6, 9) * 4
    torch.testing.assert_close(byol_loss(p, z).double(), reference_byol(p, z), rtol=1e-5, atol=1e-6)
    assert byol_loss(p, 3 * p).abs() < 1e-6  # scale-free: the same direction costs nothing


def test_symmetric_loss_and_local_term_on_the_masked_view() -> None:
    model = tiny_method("byol", **{"method.local.weight": 0.25})
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    (p1, p2), (z1, z2), (zm1, zm2), _ = outputs(model, x1, x2)
    g = reference_byol(p1, z2) + reference_byol(p2, z1)
    loc = reference_byol(p1, zm2) + reference_byol(p2, zm1)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss_global"].double(), g, **tol)
    torch.testing.assert_close(out["loss_local"].double(), loc, **tol)
    torch.testing.assert_close(out["loss"].double(), g + 0.25 * loc, **tol)


def test_heads_are_byols_with_global_batch_norm() -> None:
    model = tiny_method("byol")  # tiny: every head width 64
    linears = [(m.in_features, m.out_features) for m in model.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(32, 64), (64, 64)]  # D → hidden → out
    linears = [(m.in_features, m.out_features) for m in model.predictor.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(64, 64), (64, 64)]  # out → hidden → out
    norms = [m for m in [*model.projector.modules(), *model.predictor.modules()] if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 2 and all(type(m) is GlobalBatchNorm1d for m in norms)
    assert model.cfg.momentum == 0.99 and model.schedules(5, 5)["momentum"][0] == 0.99
