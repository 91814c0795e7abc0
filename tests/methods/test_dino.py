"""DINO against its formulas: cross-entropy between the centred, sharpened teacher softmax and the student
log-softmax, the centre's EMA over the teacher outputs, the teacher temperature warm-up, the head."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslfg.config import load_config
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.engine.metrics import flat_config
from sslfg.losses import dino_cross_entropy
from sslfg.method_config import DINOConfig
from sslfg.methods.dino import teacher_temperatures
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig
from tests.conftest import tiny_config, tiny_method
from tests.methods.references import outputs

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


def reference_h(teacher: torch.Tensor, student: torch.Tensor, center: torch.Tensor, tt: float, ts: float
                ) -> torch.Tensor:
    """-1/B Σ_b Σ_k p_t[b,k]·log p_s[b,k]; p_t = exp((t−c)/τ_t) / Σ exp(...), log p_s = s/τ_s − log Σ exp(s/τ_s),
    in float64 with the maximum subtracted by hand."""
    t = (teacher.double() - center.double()) / tt
    e = (t - t.max(1, keepdim=True).values).exp()
    p_t = e / e.sum(1, keepdim=True)
    z = student.double() / ts
    m = z.max(1, keepdim=True).values
    log_p_s = z - m - (z - m).exp().sum(1, keepdim=True).log()
    return -(p_t * log_p_s).sum(1).mean()


def test_cross_entropy_matches_formula() -> None:
    torch.manual_seed(0)
    t, s, c = torch.randn(5, 12) * 3, torch.randn(5, 12) * 3, torch.randn(1, 12)
    got = dino_cross_entropy(t, s, c, 0.04, 0.1)
    torch.testing.assert_close(got.double(), reference_h(t, s, c, 0.04, 0.1), rtol=1e-5, atol=1e-6)
    # the centre shifts every logit of a row alike only when it is constant: a real centre changes the target
    assert not torch.allclose(got, dino_cross_entropy(t, s, torch.zeros(1, 12), 0.04, 0.1))


def test_loss_local_term_and_centre_update() -> None:
    """global = (H(t2,s1) + H(t1,s2))/2 and local = (H(tm2,s1) + H(tm1,s2))/2 on the explicitly masked views,
    both with the centre before this step; then c ← 0.9·c + 0.1·mean over both views' teacher outputs."""
    model = tiny_method("dino", **{"method.local.weight": 0.5})
    with torch.no_grad():
        model.center.copy_(torch.randn_like(model.center))
    model.set_step({"teacher_temp": 0.05, "momentum": 0.996})
    c0 = model.center.clone()
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    (s1, s2), (t1, t2), (tm1, tm2), _ = outputs(model, x1, x2)

    def h(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return reference_h(t, s, c0, 0.05, 0.1)

    g, loc = (h(t2, s1) + h(t1, s2)) / 2, (h(tm2, s1) + h(tm1, s2)) / 2
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss_global"].double(), g, **tol)
    torch.testing.assert_close(out["loss_local"].double(), loc, **tol)
    torch.testing.assert_close(out["loss"].double(), g + 0.5 * loc, **tol)
    assert torch.equal(model.center, c0)  # the centre moves after the optimizer step, not in the forward
    model.after_update({"teacher_temp": 0.05, "momentum": 0.996}, applied=False)  # also after a skipped one
    torch.testing.assert_close(model.center, 0.9 * c0 + 0.1 * torch.cat([t1, t2]).mean(0, keepdim=True), **tol)
    assert "center" in model.state_dict()  # a buffer: checkpoints hold it


def test_teacher_temperature_warms_up_per_epoch() -> None:
    cfg = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    temps = teacher_temperatures(cfg, total_steps=10, per_epoch=2)  # linspace(0.04, 0.07, 3) per epoch, then 0.07
    assert temps == pytest.approx([0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07, 0.07, 0.07, 0.07])
    no_warmup = DINOConfig(teacher_temp=0.07, warmup_teacher_temp_epochs=0)
    assert teacher_temperatures(no_warmup, 3, 1) == pytest.approx([0.07] * 3)
    model = tiny_method("dino")
    assert model.schedules(10, 2)["teacher_temp"] == pytest.approx(teacher_temperatures(model.cfg, 10, 2))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_has_a_weight_normalised_last_layer(norm_last_layer: bool) -> None:
    model = tiny_method("dino", **{"method.dino.norm_last_layer": norm_last_layer})
    head = model.projector
    weight = head.last_layer.weight  # g·v/‖v‖ per output unit, g = 1 at the start
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(64))
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad is not norm_last_layer  # DINO: the norm fixed to 1 unless norm_last_layer is false
    x = torch.randn(3, 32)
    expected = torch.nn.functional.normalize(head.mlp(x), dim=-1) @ weight.T
    torch.testing.assert_close(head(x), expected)
    torch.testing.assert_close(copy.deepcopy(head)(x), head(x))  # the teacher's copy computes the same
    assert isinstance(model.predictor, torch.nn.Identity)


def test_defaults_are_main_dino_and_the_boosted_recipe_changes_what_dinos_readme_does() -> None:
    """main_dino.py's defaults (facebookresearch/dino); its README's boosted ViT-S run adds --epochs 300
    --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --norm_last_layer false."""
    main_dino = DINOConfig(momentum=0.996, out_dim=65536, norm_last_layer=True, warmup_teacher_temp=0.04,
                           teacher_temp=0.04, warmup_teacher_temp_epochs=0, student_temp=0.1, center_momentum=0.9)
    assert DINOConfig() == main_dino
    plain = flat_config(load_config(RECIPES / "dino_vit_s16_cub.yaml", [], PretrainConfig))
    boosted = flat_config(load_config(RECIPES / "dino_vit_s16_cub_boosted.yaml", [], PretrainConfig))
    assert {k: plain[k] for k in plain if k.startswith("method.dino.")} == {
        f"method.dino.{k}": v for k, v in vars(main_dino).items()}
    assert {k: plain[f"augment.{k}"] for k in ("crop_scale", "local_crops", "local_crop_scale", "local_crop_size",
                                               "local_blur_p", "interpolation")} == {
        "crop_scale": "[0.4, 1.0]", "local_crops": 8, "local_crop_scale": "[0.05, 0.4]", "local_crop_size": 96,
        "local_blur_p": 0.5, "interpolation": "bicubic"}  # DataAugmentationDINO's multi-crop
    assert {k: boosted[k] for k in boosted if boosted[k] != plain[k]} == {
        "output_dir": "runs/dino_vit_s16_cub_boosted", "train.epochs": 300, "method.dino.teacher_temp": 0.07,
        "method.dino.warmup_teacher_temp_epochs": 30, "method.dino.norm_last_layer": False}


def test_centre_moves_once_per_optimizer_step_with_the_mean_of_its_micro_batches() -> None:
    """Two micro-batches of 4 move the centre as one batch of 8 (DINO's step without accumulation)."""
    whole, split = tiny_method("dino"), tiny_method("dino")
    split.load_state_dict(whole.state_dict())
    x1, x2 = torch.randn(2, 8, 3, 16, 16)
    whole(x1, x2)
    split(x1[:4], x2[:4])
    split(x1[4:], x2[4:])
    for model in (whole, split):
        model.after_update({"teacher_temp": 0.04, "momentum": 0.996}, applied=True)
    torch.testing.assert_close(split.center, whole.center)
    assert not torch.equal(whole.center, torch.zeros_like(whole.center))


def test_last_layer_does_not_train_in_the_first_epoch(tiny_data: Path, tmp_path: Path) -> None:
    """DINO's --freeze_last_layer 1: the head's last layer (weight-normalised, v and g) keeps its initial weights
    through epoch 0 (steps 1-3 of 3 per epoch, weight decay included) and trains from epoch 1 on."""
    cfg = tiny_config(tiny_data, tmp_path / "run", checkpoint_every=1, keep_checkpoints=10, max_steps=4,
                      figure_samples=0, weight_decay=0.1)
    cfg.method.name, cfg.method.dino.norm_last_layer = "dino", False
    pretrain(cfg)
    states = [load_file(d / "model.safetensors") for d in checkpoint_dirs(tmp_path / "run")]
    last = [k for k in states[0] if k.startswith("projector.last_layer.")]
    assert len(last) == 2 and len(states) == 4
    for k in last:
        assert torch.equal(states[0][k], states[2][k]) and not torch.equal(states[2][k], states[3][k])
    assert not torch.equal(states[0]["projector.mlp.0.weight"], states[1]["projector.mlp.0.weight"])
