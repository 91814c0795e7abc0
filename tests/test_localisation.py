"""Localisation metrics (issue 13): keep precision, chance, lift, GLS box IoU and coverage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from sslfg.cli import run_cli
from sslfg.commands.localise import main as localise_main
from sslfg.config import COMMAND_LINE, ConfigError, load_config
from sslfg.data.datasets import build_dataset
from sslfg.data.transforms import eval_transform, finetune_transforms
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.evaluation.localisation import (
    backbone_looks,
    box_coverage,
    box_iou,
    centres_inside,
    chance_level,
    finetune_test_boxes,
    keep_metrics,
    keep_precision,
    yxyx_to_xyxy,
)
from sslfg.evaluation.online import OnlineLocalisation
from sslfg.finetune import build_classifier, finetune
from sslfg.methods import METHODS, build_method
from sslfg.models.backbone import forward_tokens
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig
from sslfg.weights import load_backbone
from tests.conftest import tiny_config
from tests.methods.references import reference_kept
from tests.test_finetune import ft_config

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


def write_boxed_dataset(root: Path, n_train: int = 24, n_test: int = 8, size: int = 20) -> Path:
    """A bright class-coloured square at a random place on dark noise, its box in the csv (data.boxes)."""
    rng = np.random.default_rng(1)
    colours = rng.integers(128, 256, (3, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        rows = ["class_id,dir,x0,y0,x1,y1"]
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            w, h = rng.integers(4, size // 2, 2)
            x, y = rng.integers(0, size - w), rng.integers(0, size - h)
            img[y : y + h, x : x + w] = colours[i % 3]
            rel = f"{split}/{i:04d}.png"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / rel)
            rows.append(f"{i % 3},{rel},{x},{y},{x + w},{y + h}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def boxed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_boxed_dataset(tmp_path_factory.mktemp("boxed"))


def boxed_config(data: Path, out: Path, **train: object) -> PretrainConfig:
    cfg = tiny_config(data, out, figure_samples=0, **train)
    cfg.data.boxes, cfg.data.test_split = True, "test"
    return cfg


def reference_keep_precision(vit: torch.nn.Module, images: torch.Tensor, boxes: list[tuple], ratio: float,
                             patch: int) -> tuple[float, float]:
    """Mean keep precision and chance with a loop over patch centres."""
    grid = images.shape[-1] // patch
    precisions, chances = [], []
    for kept, (x0, y0, x1, y1) in zip(reference_kept(vit, images, ratio), boxes, strict=True):
        inside = [n for n in range(grid * grid)
                  if x0 <= (n % grid + 0.5) * patch < x1 and y0 <= (n // grid + 0.5) * patch < y1]
        precisions.append(sum(n in inside for n in kept) / len(kept))
        chances.append(len(inside) / grid**2)
    return sum(precisions) / len(precisions), sum(chances) / len(chances)


def test_online_keep_precision_is_the_momentum_encoders_on_eval_images(boxed_data: Path, tmp_path: Path) -> None:
    cfg = boxed_config(boxed_data, tmp_path / "run", loc_samples=5)
    cfg.model.drop_path_rate = 0.1  # measured without drop path, and the momentum encoder keeps its mode
    model = build_method(cfg.model, cfg.method, 16)
    got = OnlineLocalisation(cfg)(model)
    assert model.momentum_encoder.training

    # Reference: test images 0, 1, 3, 5, 7 (evenly spaced), resized to 18 (16 / 0.875) and centre-cropped.
    dataset = build_dataset(cfg.data, "test", eval_transform(16, cfg.data.mean, cfg.data.std, 0.875))
    picks = [0, 1, 3, 5, 7]
    images = torch.stack([dataset[i][0] for i in picks])
    scale = 18 / 20
    boxes = [tuple(min(max(v * scale - 1, 0), 16) for v in dataset.boxes[i]) for i in picks]  # crop offset 1
    model.momentum_encoder.eval()
    precision, chance = reference_keep_precision(model.momentum_encoder, images, boxes, cfg.method.local.keep_ratio, 4)
    assert got["online_loc.keep_precision"] == pytest.approx(precision)
    assert got["online_loc.keep_chance"] == pytest.approx(chance)
    assert got["online_loc.keep_lift"] == pytest.approx(precision / chance)


def test_online_keep_precision_leaves_the_training_run_unchanged(boxed_data: Path, tmp_path: Path) -> None:
    runs = {}
    for every in (0, 1):
        cfg = boxed_config(boxed_data, tmp_path / f"loc{every}", loc_every=every, loc_samples=8)  # 2 epochs, 3 steps
        cfg.method.mocov3.predictor_dropout, cfg.model.drop_path_rate = 0.2, 0.1  # random ops the probe must not shift
        runs[every] = pretrain(cfg)
    weights = [load_file(str(checkpoint_dirs(r)[-1] / "model.safetensors")) for r in runs.values()]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "online_loc.keep_precision" in r] == [0, 3, 6]
    plain = [r for r in records if "loss" in r]
    assert plain == [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", METHODS)
def test_every_method_without_local_branch_logs_keep_precision_and_masks(name: str, boxed_data: Path,
                                                                         tmp_path: Path) -> None:
    """The teacher's kept patches exist for every method, local branch on or off: the keep precision and the
    mask figures of plain MoCo v3, BYOL and DINO runs compare with LoDisc's."""
    cfg = boxed_config(boxed_data, tmp_path / name, loc_every=1, loc_samples=8, max_steps=1)
    cfg.method.name, cfg.method.local.weight, cfg.train.figure_samples = name, 0, 2
    run = pretrain(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r["online_loc.keep_precision"] for r in records if "online_loc.keep_precision" in r]
    assert len(values) == 1 and 0 <= values[0] <= 1  # at step 0 (max_steps 1 ends before the epoch does)
    assert (run / "figures" / "masks_start.png").is_file() and (run / "figures" / "masks_end.png").is_file()


def test_online_keep_precision_needs_boxes(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", loc_every=1)
    cfg.data.test_split = "test"
    with pytest.raises(ConfigError, match=r"train.loc_every: .*'test' .* has none"):
        OnlineLocalisation(cfg)


def test_pretraining_summary_shows_the_online_keep_precision_settings(boxed_data: Path, tmp_path: Path) -> None:
    summaries: list[dict] = []
    pretrain(boxed_config(boxed_data, tmp_path / "run", loc_every=2), check=True, on_summary=summaries.append)
    assert summaries[0]["train.loc_every"] == ("every 2 epochs: 4 of 16 patches (keep_ratio 0.3, attention of every "
                                               "block) of up to 500 test images against their boxes, crop ratio 0.875")
    assert summaries[0]["data.train.boxes"] is True and not (tmp_path / "run").exists()


def reference_iou_coverage(a: tuple, b: tuple) -> tuple[float, float]:
    """IoU of boxes a (GLS) and b (object), and the fraction of b inside a, by the textbook formula."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return w * h / (area_a + area_b - w * h), w * h / area_b


def test_eval_localise_scores_the_frozen_backbone(boxed_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = pretrain(boxed_config(boxed_data, tmp_path / "run", max_steps=1))
    assert run_cli(localise_main, ["--checkpoint", str(run), "localise.top_k=3", "features.batch_size=3"]) == 0
    got = json.loads((run / "eval" / "localise.json").read_text())
    assert (run / "eval" / "figures" / "localise.png").stat().st_size > 500

    vit = load_backbone(run).eval()
    dataset = build_dataset(load_config(run / "config.yaml", [], PretrainConfig).data, "test",
                            eval_transform(16, PretrainConfig().data.mean, PretrainConfig().data.std, 0.875))
    images = torch.stack([dataset[i][0] for i in range(8)])
    boxes = [tuple(min(max(v * 18 / 20 - 1, 0), 16) for v in box) for box in dataset.boxes]
    precision, chance = reference_keep_precision(vit, images, boxes, 0.30, 4)
    assert got["loc.keep_precision"] == pytest.approx(precision)
    assert got["loc.keep_chance"] == pytest.approx(chance)
    assert got["loc.keep_lift"] == pytest.approx(precision / chance)
    tokens = vit.forward_features(images)
    sims = F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1)
    ious, coverages = [], []
    for row, box in zip(sims, boxes, strict=True):
        top = row.topk(3).indices
        r, c = top // 4, top % 4
        gls = (4.0 * c.min().item(), 4.0 * r.min().item(), 4.0 * (c.max().item() + 1), 4.0 * (r.max().item() + 1))
        iou, coverage = reference_iou_coverage(gls, box)
        ious.append(iou)
        coverages.append(coverage)
    assert got["loc.gls_iou"] == pytest.approx(sum(ious) / 8)
    assert got["loc.gls_coverage"] == pytest.approx(sum(coverages) / 8)
    assert got["protocol.kept_patches"] == 4 and got["protocol.images"] == 8
    out = capsys.readouterr().out
    assert "loc.keep_precision" in out
    for fact in ("data.test.boxes: True", "model.token_grid: 4x4 = 16 patches", "features.crop_ratio: 0.875",
                 "localise.keep_ratio: 0.3", "localise.kept_patches: 4 of 16", "localise.top_k: 3",
                 "localise.attention_layers: every block"):  # the start-up summary
        assert f"\n  {fact}\n" in out, fact
    assert got["localise.kept_patches"] == "4 of 16" and got["data.test.boxes"] is True


def test_eval_localise_takes_the_run_keep_ratio_unless_set(boxed_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A run trained at keep ratio 0.5 is scored at 0.5, not the schema's 0.30 (the study's keep15 / keep50 arms
    were); localise.keep_ratio set on the command line wins; the summary and localise.json say where it came from."""
    cfg = boxed_config(boxed_data, tmp_path / "run", max_steps=1)
    cfg.method.local.keep_ratio = 0.5
    run = pretrain(cfg)
    own = localise_main(["--checkpoint", str(run), "localise.figure_samples=0"])
    assert own["protocol.keep_ratio"] == 0.5 and own["protocol.kept_patches"] == 8
    assert own["localise.keep_ratio.source"] == f"{run / 'config.yaml'} (the run's method.local.keep_ratio)"
    out = capsys.readouterr().out
    assert "\n  localise.keep_ratio: 0.5\n" in out and "\n  localise.kept_patches: 8 of 16\n" in out
    told = localise_main(["--checkpoint", str(run), "localise.keep_ratio=0.25", "localise.figure_samples=0",
                          f"output_dir={tmp_path / 'told'}"])
    assert told["protocol.keep_ratio"] == 0.25 and told["protocol.kept_patches"] == 4
    assert told["localise.keep_ratio.source"] == COMMAND_LINE


def test_eval_localise_without_boxes_is_one_error_line(tiny_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """--check passed without boxes, and the run itself refused."""
    run = pretrain(tiny_config(tiny_data, tmp_path / "run", max_steps=1, figure_samples=0))
    for check in ([], ["--check"]):
        assert run_cli(localise_main, ["--checkpoint", str(run), "data.test_split=test", *check]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: data.boxes: eval.localise needs object boxes in data.test_split 'test'")
        assert "Traceback" not in "\n".join(err)


def test_finetune_test_boxes_follow_the_square_resize_and_centre_crop(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 20)).save(tmp_path / "images" / "wide.png")
    (tmp_path / "test.csv").write_text("class_id,dir,x0,y0,x1,y1\n0,wide.png,10,5,30,15\n")
    cfg = tiny_config(tmp_path, tmp_path / "run")
    cfg.data.boxes, cfg.data.num_classes = True, 1
    dataset = build_dataset(cfg.data, "test")
    # 40×20 → 20×20 (x halves, y stays), centre 16 crop from offset 2: (5, 5, 15, 15) − 2
    assert finetune_test_boxes(dataset, 16, 1.25).tolist() == [[3.0, 3.0, 13.0, 13.0]]


def test_glsim_fine_tune_records_gls_iou_and_coverage(boxed_data: Path, tmp_path: Path) -> None:
    cfg = ft_config(boxed_data, tmp_path / "ft", epochs=1)
    cfg.data.boxes, cfg.data.test_split, cfg.augment.resize_ratio = True, "test", 1.25
    run = finetune(cfg)
    record = json.loads((run / "metrics.json").read_text())

    # Reference: the trained model's GLS boxes (top 3 cosine similarities) on the test images, against
    # the boxes taken through the 20 → 20 resize and the centre 16 crop (offset 2).
    model, _ = build_classifier(cfg, 3)
    state = load_file(str(checkpoint_dirs(run)[-1] / "model.safetensors"))
    model.load_state_dict(state)
    model.eval()
    _, test_tf = finetune_transforms(16, cfg.augment, cfg.data.mean, cfg.data.std)
    dataset = build_dataset(cfg.data, "test", test_tf)
    images = torch.stack([dataset[i][0] for i in range(8)])
    tokens = forward_tokens(model.encoder, images)
    sims = F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1)
    ious, coverages = [], []
    for row, box in zip(sims, dataset.boxes, strict=True):
        top = row.topk(3).indices
        r, c = top // 4, top % 4
        gls = (4.0 * c.min().item(), 4.0 * r.min().item(), 4.0 * (c.max().item() + 1), 4.0 * (r.max().item() + 1))
        iou, coverage = reference_iou_coverage(gls, tuple(min(max(v - 2, 0), 16) for v in box))
        ious.append(iou)
        coverages.append(coverage)
    assert record["test.gls_iou"] == pytest.approx(sum(ious) / 8)
    assert record["test.gls_coverage"] == pytest.approx(sum(coverages) / 8)

    cfg.eval_only = True
    evaluated = json.loads(next((finetune(cfg)).glob("eval_step_*.json")).read_text())
    assert evaluated["test.gls_iou"] == record["test.gls_iou"]
