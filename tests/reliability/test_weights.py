"""Weights that do not fit, training checkpoints, unknown model names and unfinished runs, through the
real commands: each is one `error:` line naming the setting, the culprit and the next step, or (a
checkpoint of a pretraining run) is understood and loads the online encoder exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sslfg.cli import run_cli
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn
from sslfg.commands import pretrain as train_ssl
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.weights import backbone_source, create_vit, load_backbone
from tests.reliability.outcomes import user_error
from tests.reliability.procs import finetune_args, pretrain_args
from tests.test_eval_knn import TINY, data_args


@pytest.fixture(scope="module")
def finished_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("weights") / "run"
    assert run_cli(train_ssl.main, pretrain_args(tiny_data, run, **{"train.max_steps": 2,
                                                                    "train.checkpoint_every": 2})) == 0
    return run


def _args(setting: str, data: Path, out: Path, weights: Path | str) -> tuple[object, list[str]]:
    if setting == "model.weights":
        return train_ssl.main, pretrain_args(data, out, **{"model.weights": weights, "train.max_steps": 1})
    if setting == "init":
        return finetune_cli.main, finetune_args(data, out, init=weights, **{"train.epochs": 1})
    return knn.main, ["--checkpoint", str(weights), "--model", "vit_tiny_patch16_224", *TINY, *data_args(data),
                      f"output_dir={out}", "knn.figures=false"]


SETTINGS = ["model.weights", "init", "checkpoint"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_weights_with_missing_keys_are_refused(finished_run: Path, tiny_data: Path, tmp_path: Path, setting: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    state = load_file(str(finished_run / "backbone.safetensors"))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, str(partial))
    n_missing = sum(k.startswith("blocks.1.") for k in state)
    main, argv = _args(setting, tiny_data, tmp_path / "out", partial)
    message = user_error(main, argv, capsys)
    assert message.startswith(f"{setting}: '{partial}' does not fit")
    assert f"{n_missing} missing (blocks.1." in message
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "eval").exists()


@pytest.mark.parametrize("setting", SETTINGS)
def test_a_pretraining_checkpoint_is_understood(finished_run: Path, tiny_data: Path, tmp_path: Path,
                                                setting: str) -> None:
    """Its model.safetensors (keys `encoder.*`, `momentum_encoder.*`, heads) gives the online encoder."""
    (step,) = checkpoint_dirs(finished_run)
    main, argv = _args(setting, tiny_data, tmp_path / "out", step / "model.safetensors")
    result = main(argv)
    if setting == "checkpoint":
        exported = knn.main(["--checkpoint", str(finished_run), *data_args(tiny_data), "knn.figures=false",
                             f"output_dir={tmp_path / 'exported'}"])
        assert {k: v for k, v in result.items() if k.startswith(("knn.", "retrieval."))} == \
               {k: v for k, v in exported.items() if k.startswith(("knn.", "retrieval."))}
    elif setting == "model.weights":
        assert json.loads((tmp_path / "out" / "summary.json").read_text())["init"].endswith("model.safetensors")
    else:
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["init"].endswith("model.safetensors")


def test_a_checkpoint_folder_loads_the_online_encoder_exactly(finished_run: Path) -> None:
    (step,) = checkpoint_dirs(finished_run)
    name, kwargs, weights = backbone_source(str(step), "", {}, key="--checkpoint")
    vit = create_vit(name, kwargs, weights, key="--checkpoint")
    exported = load_backbone(finished_run)
    for key, value in exported.state_dict().items():
        assert torch.equal(vit.state_dict()[key], value), key


def test_unknown_model_name_blames_the_name(tiny_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    message = user_error(train_ssl.main, pretrain_args(tiny_data, tmp_path / "a", **{"model.name": "vit_tiny_patch16"}),
                         capsys)
    assert message.startswith("model.name: 'vit_tiny_patch16' is not a timm model name; close names:")
    assert "vit_tiny_patch16_224" in message and "weights" not in message
    argv = ["--random-init", "--model", "vit_tinny_patch16_224", *TINY, *data_args(tiny_data), f"output_dir={tmp_path}"]
    message = user_error(knn.main, argv, capsys)
    assert message.startswith("--model: 'vit_tinny_patch16_224'") and "vit_tiny_patch16_224" in message


def test_a_run_killed_before_the_export(finished_run: Path, tiny_data: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    killed = Path(shutil.copytree(finished_run, tmp_path / "killed"))
    for name in ("backbone.json", "backbone.safetensors", "summary.json"):
        (killed / name).unlink()
    (step,) = checkpoint_dirs(killed)
    resume = f"python train_ssl.py --config {killed / 'config.yaml'} resume=auto"
    message = user_error(knn.main, ["--checkpoint", str(killed), *data_args(tiny_data)], capsys)
    assert message.startswith(f"checkpoint: '{killed}' is a run that did not finish") and resume in message
    assert f"checkpoint={step}" in message
    message = user_error(finetune_cli.main, finetune_args(tiny_data, tmp_path / "ft", init=killed), capsys)
    assert message.startswith(f"init: '{killed}' is a run that did not finish") and resume in message
    # The checkpoint the message offers is evaluated directly.
    assert run_cli(knn.main, ["--checkpoint", str(step), *data_args(tiny_data), "knn.figures=false",
                              f"output_dir={tmp_path / 'eval'}"]) == 0


def test_a_wrapper_that_cannot_be_understood_names_the_runs_backbone(finished_run: Path, tiny_data: Path,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (step,) = checkpoint_dirs(run)
    state = load_file(str(step / "model.safetensors"))
    save_file({f"online.{k}": v for k, v in state.items()}, str(step / "model.safetensors"))
    message = user_error(*_args("init", tiny_data, tmp_path / "out", step / "model.safetensors"), capsys)
    assert "unexpected" in message and f"use the run's exported backbone {run / 'backbone.safetensors'}" in message


def test_online_knn_bank_smaller_than_k20_is_refused(tiny_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    argv = pretrain_args(tiny_data, tmp_path / "run", **{"train.knn_every": 1, "train.knn_samples": 10})
    message = user_error(train_ssl.main, argv, capsys)
    assert message.startswith("train.knn_samples: the online kNN (k 20) needs at least 20 bank images, got 10")


@pytest.mark.parametrize("model", [[], ["--model", "vit_tiny_patch16_224"]], ids=["no model", "model"])
def test_a_runs_text_file_given_as_weights_is_named_so(model: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`--checkpoint <run>/config.yaml` asked for the timm name, and with it the unpickler said 'Unsupported
    operand 111'."""
    config = tmp_path / "run" / "config.yaml"
    config.parent.mkdir()
    config.write_text("seed: 0\n")
    message = user_error(knn.main, ["--checkpoint", str(config), *model, "--check"], capsys)
    assert message == (f"checkpoint: '{config}' is a .yaml file, not weights; give the run folder that holds it "
                       f"('{config.parent}'), a checkpoint folder or a weights file (.safetensors, .pth)")
