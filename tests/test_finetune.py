"""eval.finetune end to end on tiny images: learning, outputs, init, eval_only, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslfg.cli import run_cli
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn as knn_cli
from sslfg.config import ConfigError
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.evaluation.run import build_backbone
from sslfg.finetune import build_classifier, finetune, throughput
from sslfg.models.glsim import GLSim, ViTClassifier
from sslfg.pretrain import pretrain
from sslfg.schema import EvalConfig, FinetuneConfig
from sslfg.verdicts import correct_path, read_correct
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def ft_config(data: Path, out: Path, **train: object) -> FinetuneConfig:
    cfg = FinetuneConfig(output_dir=str(out))
    cfg.data.root, cfg.data.image_size, cfg.data.num_workers, cfg.data.train_split = str(data), 16, 0, "train"
    cfg.model.name, cfg.model.patch_size = "vit_tiny_patch16_224", 4
    cfg.model.kwargs, cfg.model.top_k = {"embed_dim": 32, "depth": 2, "num_heads": 2}, 3
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup_steps = 4, 8, 0.05, 0
    cfg.train.checkpoint_every, cfg.train.log_every = 2, 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_glsim_learns_and_writes_its_outputs(tiny_data: Path, tmp_path: Path) -> None:
    cfg = ft_config(tiny_data, tmp_path / "ft", epochs=8, lr=0.1)
    cfg.augment.trivial_augment, cfg.augment.random_erasing = False, 0.0  # 24 images: keep the signal
    run = finetune(cfg)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24 and sum(losses[-3:]) < 0.8 * sum(losses[:3])  # zero-init head: starts at ln 3
    assert abs(losses[0] - torch.log(torch.tensor(3.0)).item()) < 1e-4
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test.top1", "test.top5", "test.mean_per_class"):
        assert 0 <= metrics[key] <= 1
    assert set(metrics["test.per_class"]) == {"0", "1", "2"} and metrics["head"] == "glsim"
    assert metrics["images_per_second.batch1"] > 0 and metrics["images_per_second.batch64"] > 0
    assert metrics["init"] == "scratch" and (run / "figures" / "gls_crops.png").is_file()
    hits = read_correct(correct_path(run, "test"), "test.top1")  # the per-image record the verdicts pair
    assert len(hits) == metrics["test.samples"] == 8 and hits.mean() == pytest.approx(metrics["test.top1"])
    # its plain ViT, exported: the frozen evaluations read the fine-tuned backbone as they read a pretraining run's
    frozen = EvalConfig(checkpoint=str(run))
    frozen.data.image_size = 16
    vit, info = build_backbone(frozen)
    trained = load_file(str(checkpoint_dirs(run)[-1] / "model.safetensors"))
    assert info["backbone"] == "vit_tiny_patch16_224" and torch.equal(vit.pos_embed, trained["encoder.pos_embed"])


def test_frozen_evaluation_of_a_fine_tuning_run_with_data_keys_on_the_command_line(tiny_data: Path,
                                                                                  tmp_path: Path) -> None:
    """A study on other data (its `data` keys) evaluates the supervised reference, a fine-tuning run, with data.*
    on the command line: the run's other data keys come from its config.yaml, read with the fine-tuning schema
    (before: "unknown key 'init'", read as a pretraining run's)."""
    run = finetune(ft_config(tiny_data, tmp_path / "ft", epochs=1))
    argv = ["--checkpoint", str(run), f"data.root={tiny_data}", "knn.ks=[1]", f"output_dir={tmp_path / 'knn'}"]
    assert run_cli(knn_cli.main, argv) == 0
    assert json.loads((tmp_path / "knn" / "knn.json").read_text())["data.image_size"] == 16  # the run's own


def test_eval_only_reproduces_the_saved_accuracy(tiny_data: Path, tmp_path: Path) -> None:
    cfg = ft_config(tiny_data, tmp_path / "ft", epochs=2)
    run = finetune(cfg)
    saved = json.loads((run / "metrics.json").read_text())
    cfg.eval_only = True
    assert run_cli(finetune_cli.main, ["--config", str(run / "config.yaml"), "eval_only=true"]) == 0
    again = json.loads((run / f"eval_step_{saved['step']:08d}.json").read_text())
    assert again["test.top1"] == saved["test.top1"] and again["test.per_class"] == saved["test.per_class"]


def test_eval_only_without_checkpoint_is_a_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    cfg = ft_config(tiny_data, tmp_path / "empty")
    cfg.eval_only = True
    with pytest.raises(ConfigError, match="eval_only: no checkpoint"):
        finetune(cfg)


def test_resume_is_exact(tiny_data: Path, tmp_path: Path) -> None:
    straight = finetune(ft_config(tiny_data, tmp_path / "a", epochs=2))
    cfg = ft_config(tiny_data, tmp_path / "b", epochs=2, max_steps=2)
    finetune(cfg)
    cfg.resume, cfg.train.max_steps = "auto", 0
    resumed = finetune(cfg)
    a, b = (load_file(str(checkpoint_dirs(r)[-1] / "model.safetensors")) for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_pretraining_run_and_plain_vit_head(tiny_data: Path, tmp_path: Path) -> None:
    run = pretrain(tiny_config(tiny_data, tmp_path / "pre", max_steps=1, figure_samples=0))
    cfg = ft_config(tiny_data, tmp_path / "ft")
    cfg.init, cfg.model.name = str(run), "ignored_when_init_is_a_run"
    model, info = build_classifier(cfg, 3)
    exported = load_file(str(run / "backbone.safetensors"))
    assert isinstance(model, GLSim) and info["init"].endswith("backbone.safetensors")
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in exported.items())
    cfg.model.head = "vit"
    model, _ = build_classifier(cfg, 3)
    assert isinstance(model, ViTClassifier)
    cfg.init, cfg.model.name = str(run / "backbone.safetensors"), "vit_tiny_patch16_224"  # a weights file
    model, info = build_classifier(cfg, 3)
    assert info["init"] == cfg.init
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in exported.items())
    cfg.train.epochs = 1
    assert json.loads((finetune(cfg) / "metrics.json").read_text())["head"] == "vit"


@pytest.mark.parametrize("adapter, head", [("ila", "vit"), ("ila++", "glsim")])
def test_ila_fine_tune_keeps_the_backbone_frozen(tiny_data: Path, tmp_path: Path, adapter: str, head: str) -> None:
    pre = pretrain(tiny_config(tiny_data, tmp_path / "pre", max_steps=1, figure_samples=0))
    cfg = ft_config(tiny_data, tmp_path / "ila", epochs=1)
    cfg.init, cfg.model.adapter, cfg.model.head = str(pre), adapter, head
    cfg.model.adapter_positions, cfg.model.top_k = [0], 2  # one down-sampling adapter: 4x4 grid → 2x2
    model, info = build_classifier(cfg, 3)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and 0 < info["params.trainable"] < info["params.total"]
    assert not any("adapter" in name or name.endswith("cls_token") or name.startswith("head") for name in frozen)
    run = finetune(cfg)
    after = load_file(str(checkpoint_dirs(run)[-1] / "model.safetensors"))
    assert all(torch.equal(after[name], value) for name, value in frozen.items()), "a frozen parameter moved"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["adapter"] == adapter and metrics["params.trainable"] == info["params.trainable"]
    assert metrics["init"].endswith("backbone.safetensors")


def test_inference_throughput_runs_under_the_runs_autocast() -> None:
    """metrics.json's images_per_second is the run's precision: under bf16 the layers compute in bf16."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    dtypes = []
    model.register_forward_hook(lambda _module, _inputs, output: dtypes.append(output.dtype))
    assert throughput(model, 8, make_accelerator("bf16"), batch=2, repeats=2) > 0
    assert dtypes == [torch.bfloat16] * 3  # the warm-up pass and both timed passes
