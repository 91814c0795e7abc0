"""open_run and Run on their own: what a check, a fresh run and a resumed run write and restore."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sslfg.config import ConfigError, save_config
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.checkpoint import save_checkpoint
from sslfg.engine.run import check_same_architecture, open_run
from sslfg.schema import EvalConfig, FinetuneConfig, PretrainConfig


def linear_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_check_writes_nothing_and_seeds(tmp_path: Path) -> None:
    cfg = PretrainConfig(seed=4)
    run = open_run(cfg, tmp_path / "run", "", make_accelerator(), check=True)
    assert not (tmp_path / "run").exists() and run.resume_from is None
    first = torch.rand(1)
    open_run(cfg, tmp_path / "run", "", make_accelerator(), check=True)
    assert torch.equal(torch.rand(1), first)


def test_fresh_run_then_resume(tmp_path: Path) -> None:
    cfg, out = PretrainConfig(), tmp_path / "run"
    run = open_run(cfg, out, "", make_accelerator())
    assert not (out / "config.yaml").exists() and run.resume_from is None  # written once the state is loaded
    model, optimizer = run.start(*linear_model())
    assert (out / "config.yaml").is_file() and run.start_step == 0
    save_checkpoint(run.accelerator, out, step=7, keep=1)
    saved = model.weight.detach().clone()

    with pytest.raises(ConfigError, match="linear.resume=auto"):  # a fresh run would lose the checkpoint
        open_run(cfg, out, "", make_accelerator(), resume_key="linear.resume")

    run = open_run(cfg, out, "auto", make_accelerator(), write_config=False)
    assert run.resume_from == out / "checkpoints" / "step_00000007"
    model, _ = run.start(*linear_model())
    assert run.start_step == 7 and torch.equal(model.weight, saved)


def test_loader_batches_whole_optimizer_steps(tmp_path: Path) -> None:
    cfg = PretrainConfig()
    cfg.data.num_workers = 0
    run = open_run(cfg, tmp_path, "", make_accelerator(), check=True)
    sampler, loader = run.loader(list(range(10)), batch_size=2, grad_accum_steps=2)
    assert sampler.batches_per_epoch == 4 and [len(batch) for batch in loader] == [2, 2, 2, 2]


def test_a_backbone_spelt_another_way_is_the_same_backbone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume compares the backbone file a run reads, not its spelling: relative, absolute or through a link is
    the same file; another file is refused, naming old → new."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "other.safetensors").write_bytes(b"")
    (tmp_path / "link.safetensors").symlink_to("w.safetensors")
    saved = EvalConfig(checkpoint="w.safetensors")
    save_config(saved, tmp_path / "run" / "config.yaml")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    for spelling in ("w.safetensors", "./w.safetensors", str(tmp_path / "w.safetensors"), "link.safetensors"):
        check_same_architecture(EvalConfig(checkpoint=spelling), checkpoint, "linear.resume")
    with pytest.raises(ConfigError, match=r"linear.resume: .*checkpoint: w.safetensors → other.safetensors"):
        check_same_architecture(EvalConfig(checkpoint="other.safetensors"), checkpoint, "linear.resume")


@pytest.mark.parametrize(("key", "value"), [("seed", 5), ("train.batch_size", 64), ("train.warmup_epochs", 3),
                                            ("augment.crop_scale", (0.5, 1.0)), ("data.train_split", "train"),
                                            ("data.mean", (0.1, 0.1, 0.1))])
def test_a_resume_that_would_change_the_remaining_steps_is_refused(key: str, value: object, tmp_path: Path) -> None:
    """A resume with another seed, batch, warm-up, augmentation or training split continued silently (and rewrote
    config.yaml, losing how the first steps were trained); the lr and precision (a non-finite loss's remedy), the
    epochs, logging and workers may still change."""
    save_config(PretrainConfig(), tmp_path / "run" / "config.yaml")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    free = PretrainConfig()
    free.train.epochs, free.train.log_every, free.data.num_workers, free.data.root = 300, 7, 0, "/moved/data"
    free.train.base_lr, free.train.mixed_precision = free.train.base_lr / 10, "no"
    check_same_architecture(free, checkpoint, "resume")
    changed = PretrainConfig()
    section, _, name = key.rpartition(".")
    setattr(getattr(changed, section) if section else changed, name, value)
    with pytest.raises(ConfigError, match=rf"^resume: .* than this command's: {key}: "):
        check_same_architecture(changed, checkpoint, "resume")


def test_a_checkpoint_of_another_kind_of_run_is_named_so(tmp_path: Path) -> None:
    """A fine-tuning run's checkpoint given to pretraining said only "unknown key 'init' (in <run>/config.yaml)"."""
    save_config(FinetuneConfig(init="runs/x"), tmp_path / "tuned" / "config.yaml")
    checkpoint = tmp_path / "tuned" / "checkpoints" / "step_00000003"
    with pytest.raises(ConfigError, match=r"^resume: .*step_00000003 cannot be continued by this command: .*"
                                          r"unknown key 'init'.*give a checkpoint of a run this command started"):
        check_same_architecture(PretrainConfig(), checkpoint, "resume")
