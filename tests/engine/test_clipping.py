"""train.clip_mode: `per_tensor` is DINO's `clip_gradients` (copied below), `global` torch's one norm; the DINO
recipes clip per tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from sslfg.config import ConfigError, load_config
from sslfg.engine.loop import clip_gradients
from sslfg.schema import PretrainConfig

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


# facebookresearch/dino, utils.py (commit 144f70567a6ff853b9ea44503ba37fdcf8ca41fb), verbatim
def dino_clip_gradients(model, clip):
    norms = []
    for name, p in model.named_parameters():  # noqa: B007
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def model_with_gradients(seed: int = 0) -> nn.Module:
    """Tensors whose gradient norms lie on both sides of 3: some are clipped, some are not, one has no gradient."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4), nn.Linear(4, 4))
    for i, p in enumerate(model.parameters()):
        if i != 5:  # the last Linear's bias keeps no gradient
            p.grad = torch.randn_like(p) * (0.05 if i % 2 else 2.0)
    return model


def test_per_tensor_clipping_is_dinos_clip_gradients() -> None:
    ours, theirs = model_with_gradients(), model_with_gradients()
    norms = dino_clip_gradients(theirs, 3.0)
    assert min(norms) < 3.0 < max(norms)  # both cases occur
    params = list(ours.parameters())
    clip_gradients(Accelerator(cpu=True), torch.optim.SGD(params, lr=0.1), params, 3.0, "per_tensor")
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_global_clipping_scales_every_gradient_by_one_norm() -> None:
    model, before = model_with_gradients(), model_with_gradients()
    params = list(model.parameters())
    clip_gradients(Accelerator(cpu=True), torch.optim.SGD(params, lr=0.1), params, 3.0, "global")
    grads = [p.grad for p in before.parameters() if p.grad is not None]
    scale = 3.0 / (torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) + 1e-6)
    for a, b in zip(model.parameters(), before.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad * scale)  # also those DINO's rule leaves as they are


def test_clip_mode_is_checked_and_the_dino_recipes_clip_per_tensor() -> None:
    with pytest.raises(ConfigError, match=r"train.clip_mode: expected one of 'global', 'per_tensor'"):
        load_config(None, ["train.clip_mode=norm"], PretrainConfig)
    for recipe in sorted(RECIPES.glob("dino*.yaml")):
        cfg = load_config(recipe, [], PretrainConfig)
        assert (cfg.train.clip_grad, cfg.train.clip_mode) == (3.0, "per_tensor"), recipe
