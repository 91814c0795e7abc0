"""What every registered method shares: the registry, the `method` keys and the moved old keys, gradients
only to the student, one after-update call (the EMA of a method with a teacher) per optimizer step with gradient
accumulation, and the same state-dict names for the figures and the exported backbone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sslfg.config import ConfigError, load_config
from sslfg.method_config import CONFIGS
from sslfg.methods import METHODS, MomentumMethod, build_method
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig
from tests.conftest import tiny_config, tiny_method

MOMENTUM = [name for name, cls in METHODS.items() if issubclass(cls, MomentumMethod)]  # those with a teacher


def test_registry_refuses_an_unknown_method_naming_the_known_ones() -> None:
    cfg = PretrainConfig()
    cfg.method.name = "swav"
    known = ", ".join(METHODS)
    with pytest.raises(ConfigError, match=rf"method.name: unknown method 'swav'; known methods: {known}"):
        build_method(cfg.model, cfg.method, 16)
    with pytest.raises(ConfigError, match=r"method.name: expected one of " + ", ".join(f"'{m}'" for m in METHODS)):
        load_config(None, ["method.name=swav"], PretrainConfig)


@pytest.mark.parametrize("old, new", [
    ("model.local_weight=0", "method.local.weight"), ("model.local_view=drop_tokens", "method.local.view"),
    ("model.keep_ratio=0.5", "method.local.keep_ratio"),
    ("model.attention_layers=1", "method.local.attention_layers"),
    ("model.temperature=0.1", "method.mocov3.temperature"),
    ("model.proj_hidden_dim=8", "method.mocov3.proj_hidden_dim"),
    ("model.pred_hidden_dim=8", "method.mocov3.pred_hidden_dim"),
    ("model.use_projector=false", "method.mocov3.use_projector"),
    ("model.projector_dropout=0", "method.mocov3.projector_dropout"),
    ("model.predictor_dropout=0", "method.mocov3.predictor_dropout"),
    ("train.momentum=0.9", "method.mocov3.momentum"),
])
def test_old_keys_name_their_new_place(old: str, new: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"'{old.split('=')[0]}' has moved: use {new}\b.*\(in command line\)"):
        load_config(None, [old], PretrainConfig)
    recipe = tmp_path / "old.yaml"
    section, key = old.split("=")[0].split(".")
    recipe.write_text(f"{section}:\n  {key}: {old.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=rf"has moved: use {new}\b.*\(in {recipe}\)"):
        load_config(recipe, [], PretrainConfig)


@pytest.mark.parametrize("name", MOMENTUM)
def test_each_method_has_its_own_keys_with_ranges(name: str) -> None:
    cfg = load_config(None, [f"method.name={name}", f"method.{name}.momentum=0.9"], PretrainConfig)
    assert cfg.method.name == name and getattr(cfg.method, name).momentum == 0.9
    with pytest.raises(ConfigError, match=rf"method.{name}.momentum: expected a number in \[0, 1\), got 1"):
        load_config(None, [f"method.{name}.momentum=1"], PretrainConfig)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("local", [0.0, 1.0])
def test_gradients_reach_the_student_only(name: str, local: float) -> None:
    model = tiny_method(name, **{"method.local.weight": local})
    x1, x2 = torch.randn(2, 4, 3, 16, 16)
    out = model(x1, x2)
    assert set(out) == ({"loss", "loss_global", "loss_local"} if local else {"loss", "loss_global"})
    out["loss"].backward()
    student = [p for p in model.parameters() if p.requires_grad]  # encoder, projector (and predictor)
    assert student and all(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    teacher = model.momentum_parameters() if isinstance(model, MomentumMethod) else []
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    names = {k.split(".")[0] for k in model.state_dict()}  # the names checkpoints and load_backbone read
    assert {"encoder", "projector"} <= names
    assert not teacher or {"momentum_encoder", "momentum_projector"} <= names


@pytest.mark.parametrize("name", METHODS)
def test_ema_runs_once_per_optimizer_step_with_accumulation(name: str, tiny_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method's after-update work once per optimizer step; a method with a teacher updates its EMA there
    with its momentum schedule, one without has no momentum schedule and no EMA."""
    cls = METHODS[name]
    calls: list[float] = []
    updates: list[dict[str, float]] = []
    forwards: list[int] = []
    original_after, original_forward = cls.after_update, cls.forward
    monkeypatch.setattr(cls, "after_update", lambda self, values, applied: (
        updates.append(values), original_after(self, values, applied)))
    monkeypatch.setattr(cls, "forward", lambda self, a, b: (forwards.append(1), original_forward(self, a, b))[1])
    if name in MOMENTUM:
        original_update = cls.update_momentum
        monkeypatch.setattr(cls, "update_momentum", lambda self, m: (calls.append(m), original_update(self, m)))
    cfg = tiny_config(tiny_data, tmp_path / "run", batch_size=4, grad_accum_steps=2, max_steps=3, figure_samples=0)
    cfg.method.name = name
    pretrain(cfg)
    assert len(forwards) == 6 and len(updates) == 3
    if name not in MOMENTUM:
        assert calls == [] and all("momentum" not in v for v in updates)
        return
    assert len(calls) == 3
    m0 = cls.Config().momentum
    assert calls[0] == m0 and m0 < calls[1] < calls[2] < 1  # the method's momentum schedule, step by step


# facebookresearch/dino, utils.py (commit 144f70567a6ff853b9ea44503ba37fdcf8ca41fb), verbatim
def get_params_groups(model):
    regularized = []
    not_regularized = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # we do not regularize biases nor Norm parameters
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


@pytest.mark.parametrize("name", METHODS)
def test_parameter_groups_are_the_originals(name: str) -> None:
    """MoCo v3 decays every parameter (main_moco.py: AdamW(model.parameters())); DINO (get_params_groups, copied
    above) and BYOL (§3.3: biases and batch norm excluded) decay no bias and no norm; DINO's last layer is apart,
    frozen for method.dino.freeze_last_layer epochs."""
    model = tiny_method(name, **{"method.dino.norm_last_layer": False})
    groups = model.param_groups()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for g in groups for p in g["params"]] != [] and {id(p) for g in groups for p in g["params"]} == {
        id(p) for p in trainable} and sum(len(g["params"]) for g in groups) == len(trainable)
    decayed = {id(p) for g in groups if g["wd_scale"] == 1.0 for p in g["params"]}
    if name == "mocov3":
        assert len(groups) == 1 and [id(p) for p in groups[0]["params"]] == [id(p) for p in trainable]
    else:
        regularized, not_regularized = get_params_groups(model)
        assert decayed == {id(p) for p in regularized["params"]} and not_regularized["params"]
    frozen = {n for n, p in model.named_parameters() for g in groups if g["frozen_epochs"] for q in g["params"]
              if q is p}
    assert frozen == ({"projector.last_layer.parametrizations.weight.original0",
                       "projector.last_layer.parametrizations.weight.original1"} if name == "dino" else set())
    assert {g["frozen_epochs"] for g in groups} == ({0, 1} if name == "dino" else {0})


def imports(module: str) -> set[str]:
    """The modules `sslfg/<module>.py` imports at run time (not under TYPE_CHECKING)."""
    tree = ast.parse((Path(__file__).resolve().parents[2] / "sslfg" / f"{module}.py").read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(
        node.test) for n in ast.walk(node)}
    return {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree) if id(n) not in typing_only
            and isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}


def test_method_keys_live_without_torch_and_name_the_registered_methods() -> None:
    """No import circle schema ↔ methods: the schema reads the `method` keys from sslfg.method_config, which
    imports no torch and no method; the registry and the configs name the same methods."""
    assert not any(m.startswith("sslfg.methods") for m in imports("schema"))
    assert imports("method_config") <= {"__future__", "dataclasses", "typing", "sslfg.config"}
    assert list(CONFIGS) == list(METHODS) and all(METHODS[n].Config is CONFIGS[n] for n in METHODS)
