"""End to end through the command line: outputs, exported backbone, user errors (EMA cadence: tests/methods)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslfg import load_backbone
from sslfg.cli import run_cli
from sslfg.commands import pretrain as train_ssl
from sslfg.config import ConfigError, save_config
from sslfg.methods import build_method
from sslfg.models.backbone import forward_tokens
from sslfg.pretrain import pretrain
from tests.conftest import tiny_config


def test_run_directory_and_backbone_export(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=3)
    save_config(cfg, tmp_path / "recipe.yaml")
    assert run_cli(train_ssl.main, ["--config", str(tmp_path / "recipe.yaml")]) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "backbone.safetensors", "backbone.json", "summary.json",
                 "figures/masks_start.png", "figures/masks_end.png"):
        assert (run / name).is_file(), name
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert {"loss", "loss_global", "loss_local", "lr"} <= set(board.Tags()["scalars"])
    assert [e.step for e in board.Scalars("loss")] == [1, 2, 3]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss_global", "loss_local", "lr", "weight_decay", "momentum"} <= records[-1].keys()
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["local"]["keep_ratio"] == 0.3

    # The documented timm call rebuilds the trained encoder exactly.
    meta = json.loads((run / "backbone.json").read_text())
    overlay = dict(file=str(run / "backbone.safetensors"))
    kwargs = meta["kwargs"]
    vit = timm.create_model(meta["name"], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs)
    vit.eval()
    trained = build_method(cfg.model, cfg.method, 16)
    trained.load_state_dict(load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors")))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = forward_tokens(trained.encoder.eval(), x)[:, 0]
        torch.testing.assert_close(vit(x), expected)
        torch.testing.assert_close(load_backbone(run)(x), expected)


def test_mocov3_baseline_has_no_local_branch(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=2, figure_samples=0)
    cfg.method.local.weight = 0.0
    run = pretrain(cfg)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_local" not in record and record["loss"] == record["loss_global"]


def test_bad_config_key_names_it_and_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(train_ssl.main, ["method.local.keep_ratoi=0.5"]) == 2
    err = capsys.readouterr().err
    assert "method.local.keep_ratoi" in err and "'method.local.keep_ratio'" in err and "Traceback" not in err


def test_missing_and_corrupt_images_name_the_culprit(tiny_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    cfg = tiny_config(data, tmp_path / "run", max_steps=1, figure_samples=0)
    save_config(cfg, tmp_path / "recipe.yaml")
    victim = sorted((data / "images" / "train").rglob("*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated PNG
    assert run_cli(train_ssl.main, ["--config", str(tmp_path / "recipe.yaml")]) == 2
    assert victim.name in capsys.readouterr().err

    victim.unlink()
    assert run_cli(train_ssl.main, ["--config", str(tmp_path / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "train.csv" in err


def test_no_data_root_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(train_ssl.main, [f"output_dir={tmp_path}/run"]) == 2
    assert "data.root" in capsys.readouterr().err


def test_mixed_precision_bf16_runs_and_changes_numerics(tiny_data: Path, tmp_path: Path) -> None:
    runs = {}
    for precision in ("bf16", "no"):
        cfg = tiny_config(tiny_data, tmp_path / precision, max_steps=1, figure_samples=0, mixed_precision=precision)
        runs[precision] = json.loads((pretrain(cfg) / "metrics.jsonl").read_text().splitlines()[0])
    # Same weights at step 1: the global loss moves only by bf16 rounding (the kept patches of the
    # local branch may change where attention scores nearly tie, so its loss is not compared).
    difference = abs(runs["bf16"]["loss_global"] - runs["no"]["loss_global"])
    assert 1e-6 < difference < 0.05 * runs["no"]["loss_global"]


def test_init_from_local_weights_file(tiny_data: Path, tmp_path: Path) -> None:
    first = pretrain(tiny_config(tiny_data, tmp_path / "first", max_steps=1, figure_samples=0))
    cfg = tiny_config(tiny_data, tmp_path / "second", max_steps=1, figure_samples=0)
    cfg.model.weights = str(first / "backbone.safetensors")
    model = build_method(cfg.model, cfg.method, 16)
    exported = load_file(str(first / "backbone.safetensors"))
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in exported.items())
    assert all(torch.equal(model.momentum_encoder.state_dict()[k], v) for k, v in exported.items())
    run = pretrain(cfg)
    assert json.loads((run / "summary.json").read_text())["init"] == cfg.model.weights
    cfg.model.weights = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="model.weights"):
        build_method(cfg.model, cfg.method, 16)
