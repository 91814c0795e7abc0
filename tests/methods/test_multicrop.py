"""DINO's multi-crop (METHODS §6): 2 global + N local views through both augmentation paths (sizes, seeds), the
student's pass over all of them, DINO's loss over every student view against the teacher's global ones (against
DINO's own DINOLoss, copied in tests/methods/references.py), and the recipes that cannot use them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from sslfg.cli import run_cli
from sslfg.commands import knn
from sslfg.config import ConfigError
from sslfg.data import batch_augment as ba
from sslfg.data.transforms import TwoViewTransform, geometric_steps, local_crop_size
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.models.backbone import pooled_feature
from sslfg.pretrain import local_view_sizes, pretrain
from sslfg.schema import AugmentConfig
from sslfg.weights import backbone_source, create_vit, load_backbone
from tests.conftest import tiny_config, tiny_method
from tests.methods.references import DINOHead, DINOLoss, MultiCropWrapper

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def test_local_views_have_dinos_sizes_and_leave_the_global_views_as_they_were() -> None:
    """96 px at 224 scaled to the image; view k's draws depend on (seed, k) only: the same seed gives the same
    views, and local views added after the global ones leave those bitwise as without them."""
    assert [local_crop_size(s, AugmentConfig()) for s in (224, 28, 448)] == [96, 12, 192]
    assert local_crop_size(224, AugmentConfig(local_crop_size=64)) == 64
    aug = AugmentConfig(local_crops=3)
    views = []
    for seed, config in ((5, aug), (5, aug), (5, AugmentConfig()), (6, aug)):
        torch.manual_seed(seed)
        views.append(TwoViewTransform(32, config, MEAN, STD)(image()))
    assert [tuple(v.shape) for v in views[0]] == [(3, 32, 32)] * 2 + [(3, 14, 14)] * 3
    assert all(torch.equal(a, b) for a, b in zip(views[0], views[1], strict=True))
    assert len(views[2]) == 2 and all(torch.equal(a, b) for a, b in zip(views[0], views[2], strict=False))
    assert not any(torch.equal(a, b) for a, b in zip(views[0], views[3], strict=True))
    torch.manual_seed(5)
    *crops, params = ba.TwoViewCrops(32, aug)(image())
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 14, 14)] * 3
    assert params.shape == (5, ba.NUM_PARAMS)
    assert (params[2:, ba.SOLARIZE] == 0).all()  # DINO's local views are never solarized


def test_crops_resample_as_the_recipe_says() -> None:
    for mode in ("bilinear", "bicubic"):
        crop = geometric_steps(16, AugmentConfig(interpolation=mode), (0.05, 0.4))[0]
        assert isinstance(crop, v2.RandomResizedCrop) and crop.interpolation == InterpolationMode(mode)
        assert crop.scale == (0.05, 0.4)


def test_student_sees_every_view_and_the_loss_is_dinos_dinoloss(monkeypatch: pytest.MonkeyPatch) -> None:
    """One encoder pass per view size gives each view's output as a pass of its own; loss and centre equal
    DINOLoss's on the student's outputs of all 2 + 3 views and the teacher's of the 2 global ones."""
    monkeypatch.setattr(dist, "all_reduce", lambda t: None)  # DINOLoss on one process
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    model = tiny_method("dino", **{"method.local.weight": 0.0,
                                   "model.kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2,
                                                    "dynamic_img_size": True}})
    torch.manual_seed(1)
    views = [*torch.randn(2, 4, 3, 16, 16), *torch.randn(3, 4, 3, 8, 8)]
    with torch.no_grad():
        model.center.copy_(torch.randn_like(model.center))
    reference = DINOLoss(64, 5, 0.05, 0.05, 0, 1)
    reference.center = model.center.clone()
    model.set_step({"teacher_temp": 0.05})
    student = model.student(*views)
    for view, out in zip(views, student, strict=True):
        torch.testing.assert_close(model.student(view, view)[0], out, rtol=1e-5, atol=1e-6)
    teacher = model.teacher_outputs(model.teacher_cls(torch.cat(views[:2]), attention=False)[0])
    expected = reference(torch.cat(student), torch.cat(teacher), epoch=0)
    out = model(*views)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)
    model.after_update({"momentum": 0.996, "teacher_temp": 0.05}, applied=True)
    torch.testing.assert_close(model.center, reference.center, rtol=1e-5, atol=1e-6)


class _Pooled(torch.nn.Module):
    """The backbone MultiCropWrapper expects: the image to its feature (sslfg's pooled CLS)."""

    def __init__(self, vit: torch.nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_feature(self.vit, x)


def _authors_head(head: torch.nn.Module) -> DINOHead:
    """DINO's DINOHead(use_bn=True) with the weights of sslfg's `head` (its weight norm's g and v as weight_g/_v)."""
    reference = DINOHead(32, 64, use_bn=True, hidden_dim=64, bottleneck_dim=64)
    state = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                "weight_v"): v
             for k, v in head.state_dict().items()}
    reference.load_state_dict(state)
    return reference


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")  # DINO's own head
def test_a_head_with_batch_norm_sees_every_view_at_once_as_dinos_multicropwrapper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """method.dino.use_bn_in_head: student and teacher outputs are those of DINO's MultiCropWrapper around its
    DINOHead(use_bn=True) with the same weights (one head pass over every view, its batch norm with their joint
    statistics, also in the teacher, which DINO never puts in eval mode); the loss is DINOLoss's on them. With
    batch norm a pass per view would differ: the test could not pass with the heads run view by view."""
    monkeypatch.setattr(dist, "all_reduce", lambda t: None)  # DINOLoss on one process
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    model = tiny_method("dino", **{"method.local.weight": 0.0, "method.dino.use_bn_in_head": True,
                                   "model.kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2,
                                                    "dynamic_img_size": True}})
    torch.manual_seed(1)
    views = [*torch.randn(2, 4, 3, 16, 16), *torch.randn(3, 4, 3, 8, 8)]
    with torch.no_grad():
        for p in model.projector.parameters():  # a trained-looking head: BN's affine away from (1, 0)
            p.add_(torch.randn_like(p) * 0.1)
        model.momentum_projector.load_state_dict(model.projector.state_dict())
    student = MultiCropWrapper(_Pooled(model.encoder), _authors_head(model.projector))(views)
    teacher = MultiCropWrapper(_Pooled(model.momentum_encoder), _authors_head(model.momentum_projector))(views[:2])
    torch.testing.assert_close(torch.cat(model.student(*views)), student, rtol=1e-5, atol=1e-6)
    per_view = torch.cat([model.projector(pooled_feature(model.encoder, v)) for v in views])
    assert not torch.allclose(per_view, student, atol=1e-3)  # so the joint pass is what makes them agree
    got = model.teacher_outputs(model.teacher_cls(torch.cat(views[:2]), attention=False)[0])
    torch.testing.assert_close(torch.cat(got), teacher, rtol=1e-5, atol=1e-6)
    model.set_step({"teacher_temp": 0.05})
    reference = DINOLoss(64, 5, 0.05, 0.05, 0, 1)
    torch.testing.assert_close(model(*views)["loss"], reference(student, teacher, epoch=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_dino_pretrains_with_local_views(augment_on: str, tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=2, figure_samples=2)
    cfg.method.name, cfg.data.augment_on = "dino", augment_on
    cfg.augment.local_crops, cfg.augment.local_crop_size, cfg.augment.interpolation = 2, 8, "bicubic"
    cfg.model.kwargs = {**cfg.model.kwargs, "dynamic_img_size": True}
    summaries: list[dict] = []
    run = pretrain(cfg, on_summary=summaries.append)
    assert summaries[0]["augment.local_crops"].startswith("2 local views of 8 px (scale 0.05-0.4)")
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("change, message", [
    ({"method.name": "mocov3"}, r"augment.local_crops: 2 local views are DINO's multi-crop; method.name=mocov3 uses "
                                r"the two global views only: set augment.local_crops=0, or method.name=dino"),
    ({"kwargs": {"dynamic_img_size": False}}, r"augment.local_crops: local views of 8 px need a ViT that takes "
                                              r"other sizes than data.image_size 16, and model.kwargs sets "
                                              r"dynamic_img_size: false: remove it or set it true"),
    ({"augment.local_crop_size": 6}, r"augment.local_crop_size: local views of 6 px are not a whole number of 4 px "
                                     r"patches; set augment.local_crop_size to a multiple of 4 \(e.g. 8\)"),
])
def test_local_views_a_recipe_cannot_use_are_config_errors(change: dict, message: str, tiny_data: Path,
                                                           tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.method.name = change.get("method.name", "dino")
    cfg.augment.local_crops, cfg.augment.local_crop_size = 2, change.get("augment.local_crop_size", 8)
    cfg.model.kwargs = {**cfg.model.kwargs, **change.get("kwargs", {"dynamic_img_size": True})}
    with pytest.raises(ConfigError, match=message):
        pretrain(cfg, check=True)


def test_local_views_turn_on_dynamic_img_size_and_the_backbone_rebuilds(tiny_data: Path, tmp_path: Path) -> None:
    """A recipe without timm's kwarg gets it (said in the summary); config.yaml and backbone.json record it, so
    that load_backbone, a checkpoint folder and eval.knn rebuild the trained model, initialised as a recipe that
    sets the kwarg itself."""
    runs, summaries, configs = {}, [], {}
    for name, kwargs in (("auto", {}), ("explicit", {"dynamic_img_size": True})):
        cfg = configs[name] = tiny_config(tiny_data, tmp_path / name, max_steps=2, figure_samples=0)
        cfg.method.name, cfg.augment.local_crops, cfg.augment.local_crop_size = "dino", 2, 8
        cfg.model.kwargs = {**cfg.model.kwargs, **kwargs}
        runs[name] = pretrain(cfg, on_summary=summaries.append)
    assert "dynamic_img_size" not in configs["auto"].model.kwargs  # the caller's config is left as it was
    assert summaries[0]["model.kwargs.dynamic_img_size"].startswith("true, set for augment.local_crops")
    assert "model.kwargs.dynamic_img_size" not in summaries[1]
    run = runs["auto"]
    assert json.loads((run / "backbone.json").read_text())["kwargs"]["dynamic_img_size"] is True
    assert (run / "config.yaml").read_text() == (runs["explicit"] / "config.yaml").read_text().replace(
        str(tmp_path / "explicit"), str(tmp_path / "auto"))
    exported, explicit = load_backbone(run), load_backbone(runs["explicit"])
    assert exported.dynamic_img_size
    name, kwargs, weights = backbone_source(str(checkpoint_dirs(run)[-1]), "", {})
    student = create_vit(name, kwargs, weights).eval()  # the online encoder of the last checkpoint
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(pooled_feature(exported, x), pooled_feature(student, x))
        assert torch.equal(pooled_feature(exported, x), pooled_feature(explicit, x))
    assert run_cli(knn.main, ["--checkpoint", str(run), "data.num_workers=0", "knn.ks=[5]",
                              f"output_dir={tmp_path / 'eval'}"]) == 0


def test_local_views_leave_a_backbone_that_is_not_a_vit_as_it_is(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.method.name, cfg.augment.local_crops, cfg.augment.local_crop_size = "dino", 2, 8
    cfg.model.name, cfg.model.patch_size, cfg.model.kwargs = "resnet10t", 0, {}
    assert local_view_sizes(cfg) == (cfg, {})
