"""Backbone loading: strict keys, training-wrapper checkpoints, position-embedding resampling, names, runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from sslfg.config import ConfigError
from sslfg.models.glsim import GLSim
from sslfg.weights import backbone_source, create_vit
from tests.conftest import tiny_method

MODELS = Path(__file__).resolve().parents[2] / "sslfg" / "models"
NAME = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_vit(seed: int = 0, **kwargs: object):
    torch.manual_seed(seed)
    return create_vit(NAME, {**KWARGS, **kwargs})


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
    return path


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_weights_with_missing_or_unexpected_keys_are_refused(tmp_path: Path) -> None:
    state = tiny_vit().state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    n_missing = len(state) - len(missing)
    path = save(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError) as e:
        create_vit(NAME, KWARGS, weights=str(path), key="init")
    message = str(e.value)
    assert message.startswith("init: ") and str(path) in message
    assert f"{n_missing} missing" in message and "blocks.1." in message

    extra = save({**state, "extra.weight": torch.zeros(3), "blocks.0.adapter.bias": torch.zeros(2)},
                 tmp_path / "extra.safetensors")
    with pytest.raises(ConfigError) as e:
        create_vit(NAME, KWARGS, weights=str(extra))
    message = str(e.value)
    assert message.startswith("model.weights: ") and "2 unexpected" in message and "extra.weight" in message


def test_a_replaced_classifier_head_is_the_only_allowed_difference(tmp_path: Path) -> None:
    torch.manual_seed(1)
    with_head = create_vit(NAME, KWARGS)
    state = {**with_head.state_dict(), "head.weight": torch.randn(10, 32), "head.bias": torch.randn(10)}
    loaded = create_vit(NAME, KWARGS, weights=str(save(state, tmp_path / "classifier.safetensors")))
    assert_same_weights(loaded, with_head)


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    path = save(tiny_vit(embed_dim=48, num_heads=3).state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError) as e:
        create_vit(NAME, KWARGS, weights=str(path))
    message = str(e.value)
    n_tensors = len(tiny_vit().state_dict())  # every tensor is wider, none is missing or extra
    assert message.startswith("model.weights: ") and str(path) in message
    assert f"{n_tensors} of another shape" in message and "missing" not in message and "unexpected" not in message
    assert "blocks.0.attn.proj.bias [48] in the file, [32] in the model" in message


def test_position_embeddings_are_resampled_to_another_grid(tmp_path: Path) -> None:
    source = tiny_vit()
    path = save(source.state_dict(), tmp_path / "grid4.safetensors")
    loaded = create_vit(NAME, {**KWARGS, "img_size": 32}, weights=str(path))  # 4x4 -> 8x8 patches
    # Reference: the class token's embedding is kept; the 4x4 grid of patch embeddings is resized bicubically.
    old = source.pos_embed.detach()
    grid = old[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    new = F.interpolate(grid, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([old[:, :1], new.permute(0, 2, 3, 1).reshape(1, 64, 32)], dim=1)
    assert loaded.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(loaded.pos_embed.detach(), expected)
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_pretraining_checkpoint_model_file_gives_the_online_encoder(tmp_path: Path) -> None:
    lodisc = tiny_method()
    with torch.no_grad():  # the momentum encoder differs from the online one, as after training
        for p in lodisc.momentum_encoder.parameters():
            p.add_(1.0)
    path = save(lodisc.state_dict(), tmp_path / "model.safetensors")
    assert_same_weights(create_vit(NAME, KWARGS, weights=str(path)), lodisc.encoder)


def test_finetuning_checkpoint_model_file_gives_its_encoder(tmp_path: Path) -> None:
    glsim = GLSim(tiny_vit(seed=3), num_classes=5, k=3)
    path = save(glsim.state_dict(), tmp_path / "model.safetensors")
    assert_same_weights(create_vit(NAME, KWARGS, weights=str(path)), glsim.encoder)


def test_unknown_model_name_is_an_error_on_the_name_key_with_close_names() -> None:
    with pytest.raises(ConfigError) as e:
        create_vit("vit_tiny_patch16_22", KWARGS, name_key="--model")
    message = str(e.value)
    assert message.startswith("--model: ") and "'vit_tiny_patch16_22'" in message
    assert "vit_tiny_patch16_224" in message and "weights" not in message


def killed_run(root: Path) -> Path:
    """A pretraining run directory as a kill leaves it before the export: config.yaml and a checkpoint."""
    run = root / "killed"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "train_state.json").write_text("{}")
    for name in ("optimizer.bin", "random_states_0.pkl"):  # what a checkpoint holds besides its model
        (run / "checkpoints" / "step_00000002" / name).write_bytes(b"")
    cfg = {"model": {"name": NAME, "patch_size": 4, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
           "data": {"image_size": 16}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_a_run_killed_before_the_export_is_named_as_such(tmp_path: Path) -> None:
    run = killed_run(tmp_path)
    with pytest.raises(ConfigError) as e:
        backbone_source(str(run), NAME, {}, key="--checkpoint")
    message = str(e.value)
    assert message.startswith("--checkpoint: ") and "did not finish" in message
    assert f"python train_ssl.py --config {run / 'config.yaml'} resume=auto" in message
    assert str(run / "checkpoints" / "step_00000002") in message  # the checkpoint one can evaluate instead
    assert "neither" not in message


def test_a_path_that_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        backbone_source(str(tmp_path / "runs" / "typo"), NAME, {}, key="--checkpoint")
    message = str(e.value)
    assert message.startswith(f"--checkpoint: '{tmp_path / 'runs' / 'typo'}' does not exist")
    assert "neither" not in message


def test_a_checkpoint_folder_is_understood_with_the_runs_architecture(tmp_path: Path) -> None:
    run = killed_run(tmp_path)
    step = run / "checkpoints" / "step_00000002"
    lodisc = tiny_method()
    save(lodisc.state_dict(), step / "model.safetensors")
    name, kwargs, weights = backbone_source(str(step), "vit_small_patch16_224", {}, key="init")
    assert (name, weights) == (NAME, str(step / "model.safetensors"))
    assert kwargs == KWARGS
    assert_same_weights(create_vit(name, kwargs, weights=weights, key="init"), lodisc.encoder)


def test_model_file_of_an_unreadable_wrapper_is_refused_with_the_runs_backbone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    (run / "backbone.safetensors").write_bytes(b"")  # only its name matters for the hint
    state = {f"wrapper.{k}": v for k, v in tiny_vit().state_dict().items()}
    path = save(state, step / "model.safetensors")
    with pytest.raises(ConfigError) as e:
        create_vit(NAME, KWARGS, weights=str(path))
    message = str(e.value)
    assert "unexpected" in message and str(run / "backbone.safetensors") in message


def test_the_model_layer_does_not_know_run_folders() -> None:
    """sslfg.models builds and reads the networks; weights files, checkpoints and run directories are sslfg.weights'
    and sslfg.engine's (issue 24 §5): no module of sslfg/models imports them."""
    imported = {(path.name, node.module) for path in MODELS.glob("*.py")
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {(name, module) for name, module in imported if module.startswith(("sslfg.engine", "sslfg.weights"))}
