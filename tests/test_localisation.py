"""Localisation metrics (issue 13): keep precision, chance, lift, GLS box IoU and coverage."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from sslfg.localisation import (
    backbone_looks,
    box_coverage,
    box_iou,
    centres_inside,
    chance_level,
    keep_metrics,
    keep_precision,
    yxyx_to_xyxy,
)
from tests.models.test_lodisc import reference_kept

# A 4 × 4 grid of 8 px patches (32 px image); patch (r, c) has index 4r + c and centre (8c + 4, 8r + 4).
GRID, PATCH = 4, 8


def test_a_box_around_exactly_the_kept_patches_gives_precision_one() -> None:
    box = torch.tensor([[8, 8, 24, 24]])  # rows 1-2, columns 1-2: patches 5, 6, 9, 10
    assert keep_precision(torch.tensor([[5, 6, 9, 10]]), box, GRID, PATCH).tolist() == [1.0]
    assert keep_precision(torch.tensor([[0, 5, 6, 15]]), box, GRID, PATCH).tolist() == [0.5]
    assert keep_precision(torch.tensor([[0, 3, 12, 15]]), box, GRID, PATCH).tolist() == [0.0]
    assert chance_level(box, GRID, PATCH).tolist() == [4 / 16]
    m = keep_metrics(torch.tensor([[5, 6, 9, 10], [0, 5, 6, 15]]), box.repeat(2, 1), GRID, PATCH)
    assert m == {"loc.keep_precision": 0.75, "loc.keep_chance": 0.25, "loc.keep_lift": 3.0}


def test_a_patch_counts_when_its_centre_is_inside_with_exclusive_ends() -> None:
    # Patch (1, 1) has its centre at (12, 12): x1 = y1 = 12 excludes it, 12.5 includes it.
    boxes = torch.tensor([[8.0, 8.0, 12.0, 12.0], [8.0, 8.0, 12.5, 12.5], [12.0, 4.0, 13.0, 5.0]])
    inside = centres_inside(boxes, GRID, PATCH)
    assert inside.sum(1).tolist() == [0, 1, 1]
    assert inside[1].nonzero().flatten().tolist() == [5] and inside[2].nonzero().flatten().tolist() == [1]
    assert chance_level(torch.tensor([[0, 0, 32, 32]]), GRID, PATCH).tolist() == [1.0]


def test_no_patch_centre_in_the_box_gives_an_undefined_lift() -> None:
    m = keep_metrics(torch.tensor([[0]]), torch.tensor([[0, 0, 2, 2]]), GRID, PATCH)
    assert m["loc.keep_precision"] == 0 and m["loc.keep_chance"] == 0 and math.isnan(m["loc.keep_lift"])


def test_iou_and_coverage_of_known_boxes() -> None:
    a = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [2, 2, 6, 6]])
    b = torch.tensor([[20, 20, 30, 30], [5, 0, 15, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    # disjoint; overlap 5×10 = 50 of union 150; identical; a inside b (16 of 100)
    assert box_iou(a, b).tolist() == pytest.approx([0.0, 1 / 3, 1.0, 0.16])
    assert box_iou(b, a).tolist() == pytest.approx([0.0, 1 / 3, 1.0, 0.16])
    # coverage: the fraction of the object (first) inside the crop (second)
    assert box_coverage(a, b).tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert box_coverage(b, a).tolist() == pytest.approx([0.0, 0.5, 1.0, 0.16])


def test_gls_boxes_turn_from_rows_first_to_columns_first() -> None:
    assert yxyx_to_xyxy(torch.tensor([[1, 2, 3, 4]])).tolist() == [[2, 1, 4, 3]]


def test_backbone_looks_matches_explicit_attention_and_similarity() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0).eval()
    x = torch.randn(3, 3, 32, 32)
    keep, gls = backbone_looks(vit, x, keep_ratio=0.25, top_k=3)
    assert keep.tolist() == reference_kept(vit, x, 0.25)  # the 4 patches with the largest attention product
    tokens = vit.forward_features(x)  # reference box: the top 3 cosine similarities, inclusive patch extents
    sims = F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1)
    for box, row in zip(gls.tolist(), sims, strict=True):
        top = row.topk(3).indices
        r, c = top // GRID, top % GRID
        assert box == [8 * c.min().item(), 8 * r.min().item(), 8 * (c.max().item() + 1), 8 * (r.max().item() + 1)]
