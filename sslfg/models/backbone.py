"""timm Vision Transformer: creation, token access, attention read-out and export.

Every method in sslfg uses a plain timm `VisionTransformer`; this module is the only place that
knows its internals (`patch_embed`, `_pos_embed`, `blocks`, `norm`).
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import Tensor

from sslfg.config import ConfigError
from sslfg.engine.checkpoint import unsafe_load_reason

BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_META = "backbone.json"


def timm_kwargs(img_size: int, patch_size: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments that define a backbone's geometry (recorded in backbone.json)."""
    kwargs: dict[str, Any] = {"img_size": img_size, **(extra or {})}
    if patch_size:
        kwargs["patch_size"] = patch_size
    return kwargs


def create_vit(
    name: str, kwargs: dict[str, Any], weights: str = "", drop_path_rate: float = 0.0
) -> VisionTransformer:
    """A timm ViT without classifier, from scratch or from a local weights file.

    `weights` is a safetensors file or a torch state dict (loaded with weights_only=True by timm, so
    a file holding pickled objects is refused, never executed); position embeddings are resampled by
    timm when the image or patch size differs.
    """
    if weights and not Path(weights).is_file():
        raise ConfigError(f"model.weights: no such file '{weights}'")
    try:
        model = timm.create_model(
            name,
            pretrained=bool(weights),
            pretrained_cfg_overlay={"file": str(weights)} if weights else None,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    except RuntimeError as e:
        if isinstance(e.__cause__, pickle.UnpicklingError):  # timm's wrapper of torch's weights-only refusal
            raise ConfigError(
                f"model.weights: '{weights}' is refused: it is not a plain state dict of tensors "
                f"({unsafe_load_reason(e.__cause__)}); save the weights as safetensors or a dict of tensors"
            ) from e
        raise ConfigError(f"model.weights: '{weights}' does not fit {name} {kwargs}: {e}") from e  # size mismatch
    except SafetensorError as e:
        raise ConfigError(f"model.weights: '{weights}' is refused: it is not a readable safetensors file ({e})") from e
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise ConfigError(f"model.name: '{name}' is not a timm VisionTransformer with a class token")
    return model


def grid_size(vit: VisionTransformer) -> int:
    """G, the side of the (square) patch grid."""
    rows, cols = vit.patch_embed.grid_size
    if rows != cols:
        raise ValueError(f"sslfg needs a square patch grid, got {rows}x{cols}")
    return rows


@contextlib.contextmanager
def cls_attention(vit: VisionTransformer) -> Iterator[list[Tensor]]:
    """Collects each block's head-averaged CLS-to-patch attention (B, N) during a forward.

    timm's fused attention never materialises the probabilities, so inside this context the
    blocks run the explicit path and a hook on `attn_drop` (the identity in eval mode, and the
    place the softmax output passes through) reads them. Only the momentum encoder uses it.
    """
    maps: list[Tensor] = []
    start = vit.num_prefix_tokens

    def hook(_module: torch.nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        maps.append(inputs[0][:, :, 0, start:].float().mean(dim=1))

    fused = [blk.attn.fused_attn for blk in vit.blocks]
    handles = [blk.attn.attn_drop.register_forward_hook(hook) for blk in vit.blocks]
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    try:
        yield maps
    finally:
        for blk, was_fused, handle in zip(vit.blocks, fused, handles, strict=True):
            blk.attn.fused_attn = was_fused
            handle.remove()


def forward_tokens(
    vit: VisionTransformer, x: Tensor, keep_idx: Tensor | None = None, cls_token: Tensor | None = None
) -> Tensor:
    """All output tokens after the final norm, (B, prefix + N, D).

    keep_idx (B, K): feed only these patch tokens (with their position embeddings) to the
    blocks; the output then has prefix + K tokens.
    cls_token (1, 1, D): use this class token instead of `vit.cls_token` (GLSim's crop token);
    the CLS slot still gets its position embedding where timm adds one.
    """
    x = vit._pos_embed(vit.patch_embed(x))
    if cls_token is not None:
        # timm reads vit.cls_token inside _pos_embed: swap in the other token by its difference
        # (vit.cls_token then gets no gradient from this pass), which position dropout would break.
        if vit.training and vit.pos_drop.p > 0:
            raise ValueError("a replaced class token (GLSim) needs pos_drop_rate 0: remove it from model.kwargs")
        x = torch.cat([x[:, :1] + (cls_token - vit.cls_token), x[:, 1:]], dim=1)
    if keep_idx is not None:
        start = vit.num_prefix_tokens
        patches = x[:, start:].gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :start], patches], dim=1)
    x = vit.norm_pre(vit.patch_drop(x))
    return vit.norm(vit.blocks(x))


def new_block(vit: VisionTransformer, num_heads: int | None = None) -> Block:
    """A randomly initialised transformer block of the backbone's kind (width, heads, MLP ratio,
    qkv bias, norm layer), initialised like a timm ViT; `num_heads` overrides the head count."""
    ref = vit.blocks[0]
    dim = vit.embed_dim
    block = Block(
        dim,
        num_heads or ref.attn.num_heads,
        mlp_ratio=ref.mlp.fc1.out_features / dim,
        qkv_bias=ref.attn.qkv.bias is not None,
        norm_layer=partial(type(ref.norm1), eps=ref.norm1.eps),
    )
    block.apply(init_weights_vit_timm)
    return block


def export_backbone(vit: VisionTransformer, name: str, kwargs: dict[str, Any], run_dir: Path) -> Path:
    """Writes backbone.safetensors + backbone.json so that `load_backbone(run_dir)` rebuilds it."""
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    tmp = run_dir / f".{BACKBONE_WEIGHTS}.tmp"
    save_file(state, str(tmp))
    tmp.replace(run_dir / BACKBONE_WEIGHTS)
    meta_tmp = run_dir / f".{BACKBONE_META}.tmp"
    meta_tmp.write_text(json.dumps({"name": name, "kwargs": kwargs}, indent=2))
    meta_tmp.replace(run_dir / BACKBONE_META)
    return run_dir / BACKBONE_WEIGHTS


def backbone_source(path: str, name: str, kwargs: dict[str, Any], key: str = "init") -> tuple[str, dict[str, Any], str]:
    """(timm name, kwargs, weights file) for an sslfg run directory (from its backbone.json), a
    weights file (needs `name`), or "" (`name` from scratch: weights ""). `key` names the setting
    in error messages."""
    source = Path(path) if path else None
    if source is not None and (source / BACKBONE_META).is_file():
        meta = json.loads((source / BACKBONE_META).read_text())
        return meta["name"], meta["kwargs"], str(source / BACKBONE_WEIGHTS)
    if source is not None and not source.is_file():
        raise ConfigError(f"{key}: '{source}' is neither an sslfg run directory (no {BACKBONE_META}) nor a file")
    if not name:
        raise ConfigError(f"{key}: a weights file or a scratch model needs the timm name it was saved from (model)")
    return name, kwargs, str(source or "")


def load_backbone(run_dir: str | Path) -> VisionTransformer:
    """The trained backbone of a run directory, as a timm model (no classifier), in eval mode."""
    run_dir = Path(run_dir)
    meta_path = run_dir / BACKBONE_META
    if not meta_path.is_file():
        raise ConfigError(f"{meta_path} not found: is '{run_dir}' a finished sslfg run directory?")
    meta = json.loads(meta_path.read_text())
    return create_vit(meta["name"], meta["kwargs"], weights=str(run_dir / BACKBONE_WEIGHTS)).eval()
