"""Exact resume: k steps + resume + k steps equals 2k steps in one go, bitwise on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslfg.config import ConfigError
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.methods import METHODS, MomentumMethod
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig
from tests.conftest import tiny_config
from tests.reliability.procs import assert_same_optimizer, final_state


@pytest.mark.parametrize("name, local_crops", [*((m, 0) for m in METHODS), ("dino", 2)])
def test_interrupted_mid_epoch_run_resumes_exactly(name: str, local_crops: int, tiny_data: Path,
                                                   tmp_path: Path) -> None:
    """Every method with its local branch (SimCLR, Barlow Twins, VICReg: no teacher; DINO: its centre, teacher
    temperature and last layer frozen in epoch 0 too; and with multi-crop, 2 local views of 8 px)."""
    def recipe(out: Path, **train: int) -> PretrainConfig:
        cfg = tiny_config(tiny_data, out, **train)
        cfg.method.name = name
        if local_crops:
            cfg.augment.local_crops, cfg.augment.local_crop_size = local_crops, 8
            cfg.model.kwargs = {**cfg.model.kwargs, "dynamic_img_size": True}
        return cfg

    straight = pretrain(recipe(tmp_path / "straight"))  # 3 steps per epoch, 6 in all
    # Stop mid-epoch at step 2, with loader workers this time: augmentations must not depend on them.
    cfg = recipe(tmp_path / "resumed", max_steps=2)
    cfg.data.num_workers = 2
    resumed = pretrain(cfg)
    assert [p.name for p in checkpoint_dirs(resumed)] == ["step_00000002"]
    with (resumed / "metrics.jsonl").open("a") as f:  # what an interrupted run might have logged past it
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    cfg.resume, cfg.train.max_steps = "auto", 0
    pretrain(cfg)

    model_a, optim_a, metrics_a = final_state(straight)
    model_b, optim_b, metrics_b = final_state(resumed)
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), "weights (incl. EMA encoder) differ"
    assert any(k.startswith("momentum_encoder.") for k in model_a) == issubclass(METHODS[name], MomentumMethod)
    assert_same_optimizer(optim_a, optim_b)
    assert metrics_a == metrics_b and [m["step"] for m in metrics_a] == [1, 2, 3, 4, 5, 6]


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    pretrain(tiny_config(tiny_data, tmp_path / "run", max_steps=2))
    with pytest.raises(ConfigError, match="resume=auto"):
        pretrain(tiny_config(tiny_data, tmp_path / "run", max_steps=2))


def test_resume_ignores_half_written_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    run = pretrain(tiny_config(tiny_data, tmp_path / "run", max_steps=2))
    broken = run / "checkpoints" / ".tmp-step_00000004"  # a save killed before its rename
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=4)
    cfg.resume = "auto"
    pretrain(cfg)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002", "step_00000004"]


def test_a_resumed_run_reports_the_whole_runs_training_time(tiny_data: Path, tmp_path: Path) -> None:
    """summary.json's seconds and images/s cover steps 1-6, not only the 4 after the resume: the checkpoint keeps
    the loop's seconds and images; a checkpoint from before it kept them gives unknown (None), never a part."""
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=2)  # batch 8, 6 steps in all
    run = pretrain(cfg)
    first = json.loads((run / "summary.json").read_text())
    state_file = run / "checkpoints" / "step_00000002" / "train_state.json"
    saved = json.loads(state_file.read_text())
    assert saved["images_seen"] == 16 and 0 < saved["seconds"] <= first["seconds"]  # the run's, up to that save
    cfg.resume, cfg.train.max_steps = "auto", 0
    pretrain(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 6 and summary["seconds"] > saved["seconds"]
    # 48 images over the whole run's seconds (the summary rounds them to 0.01 s: on a fast machine a few %)
    seconds = summary["seconds"]
    assert summary["images_per_second"] == pytest.approx(6 * 8 / seconds, rel=0.01 + 0.006 / seconds)

    old = tiny_config(tiny_data, tmp_path / "old", max_steps=2)
    pretrain(old)
    state_file = tmp_path / "old" / "checkpoints" / "step_00000002" / "train_state.json"
    saved = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: saved[k] for k in ("step", "files")}))
    old.resume, old.train.max_steps = "auto", 0
    pretrain(old)
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["seconds"] is None and summary["images_per_second"] is None
