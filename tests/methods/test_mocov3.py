"""MoCo v3 (the global branch of LoDisc) against its formulas: InfoNCE × 2T, heads, EMA."""

from __future__ import annotations

import torch

from sslfg.losses import contrastive_loss
from tests.conftest import tiny_method
from tests.methods.references import outputs, reference_ctr

NO_DROPOUT = {"method.mocov3.projector_dropout": 0.0, "method.mocov3.predictor_dropout": 0.0}


def test_contrastive_loss_matches_formula() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(5, 7), torch.randn(5, 7)
    torch.testing.assert_close(contrastive_loss(q, k, 0.2).double(), reference_ctr(q, k, 0.2), rtol=1e-5, atol=1e-6)


def test_local_weight_zero_is_moco_v3() -> None:
    model = tiny_method(**NO_DROPOUT, **{"method.local.weight": 0.0, "method.mocov3.temperature": 0.3})
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    assert set(out) == {"loss", "loss_global"} and torch.equal(out["loss"], out["loss_global"])
    (q1, q2), (k1, k2), _, _ = outputs(model, x1, x2)
    ref = reference_ctr(q1, k2, 0.3) + reference_ctr(q2, k1, 0.3)
    torch.testing.assert_close(out["loss"].double(), ref, rtol=1e-4, atol=1e-5)


def test_gradients_reach_online_but_not_momentum_branch() -> None:
    model = tiny_method()
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    model(x1, x2)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.requires_grad)
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_parameters())


def test_ema_update_formula_and_predictor_untouched() -> None:
    model = tiny_method()
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    before_m = [p.clone() for p in model.momentum_parameters()]
    online = [p.clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]]
    predictor = [p.clone() for p in model.predictor.parameters()]
    model.update_momentum(0.9)
    for pm, b, p in zip(model.momentum_parameters(), before_m, online, strict=True):
        torch.testing.assert_close(pm, 0.9 * b + 0.1 * p)
    assert all(torch.equal(a, b) for a, b in zip(model.predictor.parameters(), predictor, strict=True))


def layer_kinds(mlp: torch.nn.Module) -> list[str]:
    """e.g. ["Linear(32,64)", "BN", "ReLU", "Dropout(0.2)", ..., "BN-noaffine"]."""
    kinds = []
    for m in mlp:
        if isinstance(m, torch.nn.Linear):
            kinds.append(f"Linear({m.in_features},{m.out_features}{',bias' if m.bias is not None else ''})")
        elif isinstance(m, torch.nn.BatchNorm1d):
            kinds.append("BN" if m.affine else "BN-noaffine")
        elif isinstance(m, torch.nn.Dropout):
            kinds.append(f"Dropout({m.p})")
        else:
            kinds.append(type(m).__name__)
    return kinds


def test_projector_and_predictor_follow_lodisc_build_mlp() -> None:
    # LoDisc's _build_mlp (MoCo v3's plus Dropout(0.2)): projector _build_mlp(3, D, h, D), predictor
    # _build_mlp(2, D, h, D) with last_bn=True: both end in BatchNorm1d(affine=False).
    model = tiny_method()  # dropouts at their default, 0.2
    hidden = ["BN", "ReLU", "Dropout(0.2)"]
    assert layer_kinds(model.projector) == [
        "Linear(32,64)", *hidden, "Linear(64,64)", *hidden, "Linear(64,32)", "BN-noaffine"]
    assert layer_kinds(model.predictor) == ["Linear(32,64)", *hidden, "Linear(64,32)", "BN-noaffine"]
    no_dropout = tiny_method(**NO_DROPOUT).predictor
    assert layer_kinds(no_dropout) == ["Linear(32,64)", "BN", "ReLU", "Linear(64,32)", "BN-noaffine"]
    assert isinstance(tiny_method(**{"method.mocov3.use_projector": False}).projector, torch.nn.Identity)
    # the final BN acts: in training, every output dimension has zero mean and unit variance over the batch
    q = model.predictor(torch.randn(16, 32) * 5 + 3)
    torch.testing.assert_close(q.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)
