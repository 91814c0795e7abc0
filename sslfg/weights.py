"""Weights and run folders: a backbone built with its weights (a file, an sslfg run directory's exported backbone,
a training checkpoint folder, or timm's pretrained weights from the Hugging Face cache), loaded strictly; the
export of a trained backbone (backbone.safetensors + backbone.json) and `load_backbone`, which reads it back.
The ViT itself (creation, tokens, attention read-out) is sslfg.models.backbone's; this module is the one that
knows the run directory's layout of weights.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import save_file
from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor

from sslfg.config import ConfigError
from sslfg.engine.checkpoint import (
    CHECKPOINTS,
    STATE_FILE,
    checkpoint_dirs,
    missing_file,
    refuse_incomplete,
    unsafe_load_reason,
)
from sslfg.engine.rundir import RUN_CONFIG, read_run_file
from sslfg.files import atomic_path, write_json
from sslfg.models.backbone import HF_HUB, build_model, hub_errors, hub_tags, require_vit, timm_kwargs

BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_META = "backbone.json"
CHECKPOINT_MODEL = "model.safetensors"  # the model file accelerate writes into a checkpoint folder
ARCHITECTURE_CFG = ("architecture", "first_conv", "classifier")  # pretrained_cfg keys that describe the model
WRAPPED_ENCODER = "encoder."  # the backbone's prefix in LoDisc's, GLSim's and ViTClassifier's state dicts


def create_backbone(
    name: str, kwargs: dict[str, Any], weights: str = "", drop_path_rate: float = 0.0, key: str = "model.weights",
    name_key: str = "model.name", pretrained: bool = False, kwargs_key: str = "model.kwargs",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A timm model without classifier, from scratch, from local weights or, with `pretrained`, from timm's
    weights for `name` (a timm name with or without its tag, or `hf-hub:org/repo`) through the Hugging
    Face cache (`hub_weights`); either file is loaded strictly (see `load_weights`). Returns the model and the
    kwargs it was built with (to record and rebuild it).

    A ViT needs a class token; any other timm model is taken for its pooled feature (what its forward gives
    without classifier: ResNet, ConvNeXt, ...), which is all the global methods, kNN, the linear probe and the
    plain fine-tuning head use (`pooled_feature`); what reads a ViT's attention or tokens asks `require_vit`.
    A model that takes no image size (a CNN) is built without the `img_size` of `kwargs`.

    `key`, `name_key` and `kwargs_key` name the settings that gave `weights`, `name` and `kwargs` in error
    messages (`model.weights` / `init` / `--checkpoint`, `model.name` / `--model`, `model.kwargs` / `model_kwargs`).
    """
    model, kwargs = build_model(name, kwargs, drop_path_rate, key, name_key, kwargs_key)
    weights = weights_file(weights, key) if weights else ""
    if pretrained:
        weights = hub_weights(model, name, name_key, key)
    if weights:
        load_weights(model, weights, key, f"{name} {kwargs}")
    return model, kwargs


def create_vit(
    name: str, kwargs: dict[str, Any], weights: str = "", drop_path_rate: float = 0.0, key: str = "model.weights",
    name_key: str = "model.name", pretrained: bool = False,
) -> VisionTransformer:
    """`create_backbone`'s model, which must be a ViT with a class token."""
    model, _ = create_backbone(name, kwargs, weights, drop_path_rate, key, name_key, pretrained)
    require_vit(model, name, name_key, "sslfg's ViT code", "give a timm VisionTransformer name (vit_*, deit_*)")
    return model


def hub_weights(vit: VisionTransformer, name: str, name_key: str, key: str) -> str:
    """The local file of timm's pretrained weights for `vit`, built from `name`: from the Hugging Face
    cache, downloaded into it first unless HF_HUB_OFFLINE is set. The file is recorded in
    `vit.pretrained_cfg["file"]`, where timm records a file it loads, for `pretrained_record`."""
    cfg = vit.pretrained_cfg
    if not cfg.get("hf_hub_id"):
        raise ConfigError(f"{name_key}: timm has no Hugging Face hub weights for '{name}' (tags with weights: "
                          f"{', '.join(hub_tags(name)) or 'none'}); or give a local weights file as {key}=PATH")
    repo, revision = hf_split(cfg["hf_hub_id"])
    # timm's order: the file its config names, else safetensors before the pickled state dict
    *first, last = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    path = ""
    for filename in first:
        with contextlib.suppress(EntryNotFoundError):  # not in the repository, or offline and not cached
            path = hf_hub_download(repo, filename, revision=revision)
            break
    if not path:
        with hub_errors("weights file", name, name_key, key, repo):
            path = hf_hub_download(repo, last, revision=revision)
    cfg["file"] = path
    return path


def pretrained_record(vit: VisionTransformer) -> dict[str, str]:
    """What `hub_weights` loaded into `vit` (name, tag, hub id, file) for a run's summary; {} for another init."""
    cfg = vit.pretrained_cfg
    if not cfg.get("file") or not cfg.get("hf_hub_id"):
        return {}
    tag = cfg.get("tag") or ""
    name = f"{HF_HUB}{cfg['hf_hub_id']}" if cfg.get("source") == "hf-hub" else ".".join(filter(None, (
        cfg["architecture"], tag)))
    return {"init": f"pretrained {name}", "pretrained.name": name, "pretrained.tag": tag,
            "pretrained.hub_id": cfg["hf_hub_id"], "pretrained.file": cfg["file"]}


def weights_file(path: str, key: str) -> str:
    """The weights file `path` stands for: itself, a run directory's exported backbone, or a training
    checkpoint folder's model file (whose backbone `load_weights` takes out)."""
    source = Path(path)
    if source.is_file():
        return path
    _refuse_incomplete_checkpoint(source, key)
    if (source / BACKBONE_WEIGHTS).is_file():
        return str(source / BACKBONE_WEIGHTS)
    if (source / CHECKPOINT_MODEL).is_file():
        return str(source / CHECKPOINT_MODEL)
    if source.is_dir():
        _refuse_unfinished_run(source, key)
        raise ConfigError(f"{key}: '{source}' is a folder without weights ({BACKBONE_WEIGHTS} or {CHECKPOINT_MODEL}); "
                          "give a weights file, an sslfg run directory or one of its checkpoints/step_* folders")
    raise ConfigError(f"{key}: no such file '{path}'")


TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".csv", ".txt", ".md")


def refuse_text_file(path: str | Path, key: str) -> None:
    """ConfigError for a run's config.yaml, summary.json (...) given as weights: the unpickler's complaint about it
    ("Unsupported operand 111"), or a request for its timm name, would not say what it is."""
    if Path(path).suffix.lower() in TEXT_SUFFIXES:
        raise ConfigError(f"{key}: '{path}' is a {Path(path).suffix} file, not weights; give the run folder that "
                          f"holds it ('{Path(path).parent}'), a checkpoint folder or a weights file (.safetensors, "
                          ".pth)")


def read_state_dict(path: str, key: str) -> dict[str, Any]:
    """The tensors of a safetensors file or a torch state dict, read without running pickled code."""
    refuse_text_file(path, key)
    try:
        return timm.models.load_state_dict(path)  # torch.load(weights_only=True) unless .safetensors
    except (RuntimeError, pickle.UnpicklingError) as e:
        cause = e if isinstance(e, pickle.UnpicklingError) else e.__cause__
        if not isinstance(cause, pickle.UnpicklingError):  # timm wraps torch's weights-only refusal
            raise ConfigError(f"{key}: '{path}' is refused: it is not a readable weights file ({e})") from e
        raise ConfigError(
            f"{key}: '{path}' is refused: it is not a plain state dict of tensors "
            f"({unsafe_load_reason(cause)}); save the weights as safetensors or a dict of tensors"
        ) from e
    except SafetensorError as e:
        raise ConfigError(f"{key}: '{path}' is refused: it is not a readable safetensors file ({e})") from e


def backbone_state(state: dict[str, Any]) -> dict[str, Any]:
    """The backbone's entries of a state dict: all of them, or for a training wrapper saved whole
    (LoDisc's checkpoint holds `encoder.*` and `momentum_encoder.*`, GLSim's `encoder.*` and its
    head) the online encoder's, unprefixed."""
    prefix = WRAPPED_ENCODER
    if "cls_token" in state or f"{prefix}cls_token" not in state:
        return state
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def load_weights(vit: VisionTransformer, path: str, key: str, what: str) -> None:
    """Loads a weights file into `vit`, strictly: every backbone tensor must be in the file and
    every tensor of the file in the backbone, with its shape; the classifier head (`head.*`), which
    sslfg replaces on purpose, is the only entry ignored. Position and patch embeddings are
    resampled by timm's checkpoint filter when the image or patch size differs. Anything else is a
    ConfigError naming `key`, the file, the counts and a few of the keys; a partly loaded backbone
    would otherwise train or be evaluated as a random init recorded under the file's name."""
    state = checkpoint_filter_fn(backbone_state(read_state_dict(path, key)), vit)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = vit.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    reshaped = sorted(f"{k} {list(getattr(state[k], 'shape', []))} in the file, {list(own[k].shape)} in the model"
                      for k in own.keys() & state.keys()
                      if not isinstance(state[k], Tensor) or state[k].shape != own[k].shape)
    problems = [f"{len(keys)} {kind} ({_few(keys)})" for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if keys]
    if problems:
        raise ConfigError(f"{key}: '{path}' does not fit {what}: backbone keys {'; '.join(problems)}; "
                          f"{_mismatch_hint(Path(path))}")
    vit.load_state_dict(state)


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _mismatch_hint(path: Path) -> str:
    run = path.parent.parent.parent
    if path.parent.parent.name == CHECKPOINTS and (run / BACKBONE_WEIGHTS).is_file():
        return f"this is a training checkpoint: use the run's exported backbone {run / BACKBONE_WEIGHTS}"
    if path.parent.parent.name == CHECKPOINTS and (run / RUN_CONFIG).is_file():
        return (f"this is a training checkpoint of a run that has not exported its backbone: finish it with "
                f"`python train_ssl.py --config {run / RUN_CONFIG} resume=auto`, then use {run / BACKBONE_WEIGHTS}")
    return "give the timm name and kwargs (geometry) the file was saved from"


def _refuse_incomplete_checkpoint(source: Path, key: str) -> None:
    """ConfigError for a training checkpoint folder that lacks a file it was written with (or has one cut short)."""
    if (source / STATE_FILE).is_file() and (problem := missing_file(source)):
        refuse_incomplete(source, problem, key)


def _refuse_unfinished_run(source: Path, key: str) -> None:
    """ConfigError for a run directory killed before its export (config.yaml and checkpoints/, no backbone.json)."""
    if not ((source / RUN_CONFIG).is_file() and (source / CHECKPOINTS).is_dir()):
        return
    steps = checkpoint_dirs(source)
    instead = f"; or use its newest checkpoint directly: {key}={steps[-1]}" if steps else ""
    raise ConfigError(f"{key}: '{source}' is a run that did not finish (it stopped before writing {BACKBONE_META}); "
                      f"continue it with `python train_ssl.py --config {source / RUN_CONFIG} resume=auto`{instead}")


def export_backbone(vit: VisionTransformer, name: str, kwargs: dict[str, Any], run_dir: Path,
                    data_config: dict[str, Any] | None = None) -> Path:
    """Writes backbone.safetensors + backbone.json so that `load_backbone(run_dir)` rebuilds it; the json's
    pretrained_cfg (timm's format) holds `data_config`, the preprocessing the weights expect (eval_data_config)."""
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    with atomic_path(run_dir / BACKBONE_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(run_dir / BACKBONE_META, {"name": name, "kwargs": kwargs,
                                         "pretrained_cfg": exported_cfg(vit, data_config or {})})
    return run_dir / BACKBONE_WEIGHTS


def exported_cfg(model: torch.nn.Module, data_config: dict[str, Any]) -> dict[str, Any]:
    """The timm pretrained_cfg of weights sslfg trained: the architecture's keys of the model's config (not its
    hub id, tag or licence, which describe other weights) and `data_config`, for a model without classifier."""
    own = {k: model.pretrained_cfg[k] for k in ARCHITECTURE_CFG if k in model.pretrained_cfg}
    # custom_load False: a plain state dict, not the format a timm default config may name (a ViT's JAX .npz),
    # which an overlay of this config on that default would otherwise keep
    return {**own, **data_config, "num_classes": 0, "custom_load": False}


def backbone_meta(run_dir: Path) -> dict[str, Any]:
    """A run's backbone.json (timm name and kwargs of backbone.safetensors); one error when it is damaged."""
    return read_run_file(run_dir / BACKBONE_META, f"give its weights file with their timm name instead, e.g. "
                         f"--checkpoint {run_dir / BACKBONE_WEIGHTS} --model <timm name>", ("name", "kwargs"))


def backbone_source(path: str, name: str, kwargs: dict[str, Any], key: str = "init") -> tuple[str, dict[str, Any], str]:
    """(timm name, kwargs, weights file) for an sslfg run directory (from its backbone.json), a
    training checkpoint folder `<run>/checkpoints/step_N` (architecture from `<run>/config.yaml`,
    weights its model file, of which `create_vit` takes the online encoder), a weights file (needs
    `name`), or "" (`name` from scratch: weights ""). `key` names the setting in error messages."""
    source = Path(path) if path else None
    if source is not None and (source / BACKBONE_META).is_file():
        meta = backbone_meta(source)
        return meta["name"], meta["kwargs"], str(source / BACKBONE_WEIGHTS)
    if source is not None:
        _refuse_incomplete_checkpoint(source, key)
    if source is not None and (source / CHECKPOINT_MODEL).is_file():
        name, kwargs = _run_architecture(source.parent.parent, name, kwargs, key)
        return name, kwargs, str(source / CHECKPOINT_MODEL)
    if source is not None and not source.exists():
        raise ConfigError(f"{key}: '{source}' does not exist (resolved to {source.resolve()}); give an sslfg run "
                          "directory, a checkpoint folder or a weights file")
    if source is not None and not source.is_file():
        if source.is_dir():
            _refuse_unfinished_run(source, key)
        raise ConfigError(f"{key}: '{source}' is neither an sslfg run directory (no {BACKBONE_META}), a checkpoint "
                          f"folder (no {CHECKPOINT_MODEL}) nor a file")
    if source is not None:
        refuse_text_file(source, key)
    if not name:
        raise ConfigError(f"{key}: a weights file or a scratch model needs the timm name it was saved from (model)")
    return name, kwargs, str(source or "")


def _run_architecture(run: Path, name: str, kwargs: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
    """The backbone a run trained, from its config.yaml (model.name, model.patch_size, model.kwargs,
    data.image_size; a fine-tuning run's `init` run directory names it first); (name, kwargs) when
    the folder is not inside a run."""
    config = run / RUN_CONFIG
    if not config.is_file():
        return name, kwargs
    try:
        raw = yaml.safe_load(config.read_text()) or {}
        model, data = raw.get("model", {}), raw.get("data", {})
        run_name = model["name"]
        run_kwargs = timm_kwargs(data.get("image_size", 224), model.get("patch_size", 0), model.get("kwargs"))
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}: cannot read the backbone's name from {config} ({e}); give the run's "
                          f"{BACKBONE_WEIGHTS} or the checkpoint's {CHECKPOINT_MODEL} with the model name") from e
    if raw.get("init"):
        run_name, run_kwargs, _ = backbone_source(raw["init"], run_name, run_kwargs, key)
    return run_name, run_kwargs


def load_backbone(run_dir: str | Path) -> torch.nn.Module:
    """The trained backbone of a run directory, as a timm model (no classifier), in eval mode."""
    run_dir = Path(run_dir)
    meta_path = run_dir / BACKBONE_META
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} not found: is '{run_dir}' a finished sslfg run directory?")
    meta = backbone_meta(run_dir)
    vit, _ = create_backbone(meta["name"], meta["kwargs"], weights=str(run_dir / BACKBONE_WEIGHTS))
    vit.eval()
    if "pretrained_cfg" in meta:  # runs before it got timm's defaults (mean and std 0.5 for most ViTs)
        vit.pretrained_cfg = vit.default_cfg = meta["pretrained_cfg"]  # timm keeps both names of one dict
    return vit
