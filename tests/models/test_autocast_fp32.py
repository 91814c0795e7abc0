"""What the code means as float32 stays float32 under bf16 autocast: GLSim's CLS-patch scores (so the
top-k boxes) and the InfoNCE logits of LoDisc / MoCo v3 (issue 15, item 6)."""

from __future__ import annotations

import torch

from sslfg.losses import contrastive_loss
from sslfg.models.glsim import gls_boxes, gls_scores


def test_gls_scores_and_boxes_under_bf16_autocast_equal_fp32() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(4, 1 + 196, 64)  # CLS + a 14 x 14 grid
    scores = gls_scores(tokens)
    boxes = gls_boxes(tokens, patch_size=16, k=8)
    reference = torch.einsum("bd,bnd->bn", *(t / t.norm(dim=-1, keepdim=True) for t in (tokens[:, 0], tokens[:, 1:])))
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-6)  # cosines, computed independently
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(gls_scores(tokens), scores) and gls_scores(tokens).dtype == torch.float32
        assert torch.equal(gls_boxes(tokens, patch_size=16, k=8), boxes)


def test_contrastive_loss_under_bf16_autocast_equals_fp32() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(16, 32, requires_grad=True), torch.randn(16, 32)
    loss = contrastive_loss(q, k, 0.2)
    (grad,) = torch.autograd.grad(loss, q)
    with torch.autocast("cpu", torch.bfloat16):
        loss_bf16 = contrastive_loss(q, k, 0.2)
    (grad_bf16,) = torch.autograd.grad(loss_bf16, q)
    assert loss_bf16.dtype == torch.float32 and torch.equal(loss_bf16, loss) and torch.equal(grad_bf16, grad)
