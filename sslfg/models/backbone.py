"""timm backbones: creation, token access and attention read-out (their weights and run folders: sslfg.weights).

LoDisc's local branch, GLSim, ILA and the localisation read a plain timm `VisionTransformer`'s tokens and
attention; the global methods and the evaluations take any timm model's pooled feature (`pooled_feature`).
This module is the only place that knows a ViT's internals (`patch_embed`, `_pos_embed`, `blocks`, `norm`).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import re
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from timm.models import split_model_name_tag
from timm.models.vision_transformer import Block, VisionTransformer, init_weights_vit_timm
from torch import Tensor

from sslfg.config import ConfigError


def sizes_near(size: int, patch: int) -> str:
    """The two image sizes around `size` that `patch` divides."""
    below = max(patch, size // patch * patch)
    return f"{below} or {below + patch}"


def check_patch_grid(image_size: int, patch_size: int, name: str) -> None:
    """ConfigError unless `patch_size` (of the built timm model `name`) divides `image_size`: timm would
    silently cut off the last pixel rows and columns. Catches the timm default patch sizes that the
    schema's relation (model.patch_size, when set) cannot know."""
    if image_size % patch_size:
        raise ConfigError(
            f"data.image_size: {image_size} is not a multiple of the patch size {patch_size} of {name}, so the "
            f"last {image_size % patch_size} pixel rows and columns would be cut off; use a data.image_size of "
            f"{sizes_near(image_size, patch_size)}, or set model.patch_size to a divisor of {image_size}"
        )


HF_HUB = "hf-hub:"  # timm's prefix of a Hugging Face hub model name


def timm_kwargs(img_size: int, patch_size: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments that define a backbone's geometry (recorded in backbone.json)."""
    kwargs: dict[str, Any] = {"img_size": img_size, **(extra or {})}
    if patch_size:
        kwargs["patch_size"] = patch_size
    return kwargs


def build_model(
    name: str, kwargs: dict[str, Any], drop_path_rate: float = 0.0, key: str = "model.weights",
    name_key: str = "model.name", kwargs_key: str = "model.kwargs",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A timm model without classifier and random weights, and the kwargs it was built with (to record and rebuild
    it); `name` is a timm name with or without its tag, or `hf-hub:org/repo` (its architecture from the Hugging Face
    cache). A ViT needs a class token; any other timm model is taken for its pooled feature (`pooled_feature`).
    A model that takes no image size (a CNN) is built without the `img_size` of `kwargs`. `key`, `name_key` and
    `kwargs_key` name the settings in error messages (see sslfg.weights.create_backbone)."""
    _check_name(name, name_key)
    nulls = [k for k, v in kwargs.items() if v is None]
    if nulls:  # timm drops a None keyword without a word, so the model would silently keep its default
        raise ConfigError(f"{kwargs_key}: '{nulls[0]}' has no value (null), which timm would silently ignore; give "
                          f"it a value or remove it")
    try:
        with hub_errors("config.json", name, name_key, key):  # an hf-hub: name's architecture comes from the hub
            model, kwargs = _build(name, kwargs, drop_path_rate)
    except (TypeError, ValueError, AssertionError) as e:  # timm's reactions to a bad keyword or geometry
        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(e))
        if unknown:
            valid = [p for p in inspect.signature(VisionTransformer).parameters if p not in ("args", "kwargs")]
            close = difflib.get_close_matches(unknown[1], valid, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"timm's VisionTransformer takes: {', '.join(valid)}"
            raise ConfigError(f"{kwargs_key}: timm's '{name}' takes no argument '{unknown[1]}'; {hint}") from e
        raise ConfigError(f"{name_key}: timm cannot build '{name}' with {kwargs}: {e}; check the model's kwargs") from e
    if isinstance(model, VisionTransformer):
        if model.cls_token is None:
            raise ConfigError(f"{name_key}: '{name}' is a timm VisionTransformer without a class token")
        if model.patch_embed.img_size is not None:  # None: timm's dynamic image size
            check_patch_grid(model.patch_embed.img_size[0], model.patch_embed.patch_size[0], name)
    return model, kwargs


def _build(name: str, kwargs: dict[str, Any], drop_path_rate: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """timm's model for `name` and the kwargs it took: `kwargs`, less `img_size` for a model without one."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                                 **kwargs), kwargs
    except TypeError as e:
        if "img_size" not in kwargs or "'img_size'" not in str(e):
            raise
    kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}  # data.image_size only sizes the inputs
    return timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **kwargs), kwargs


def require_vit(model: torch.nn.Module, name: str, key: str, what: str, instead: str) -> None:
    """ConfigError on `key` unless `model` is a timm ViT: `what` reads its attention or patch tokens; `instead`
    says what to change."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{key}: {what} needs a ViT's attention and patch tokens, but the backbone '{name}' is a "
                          f"{type(model).__name__}, which gives only a pooled feature; {instead}")


def pooled_feature(model: torch.nn.Module, x: Tensor) -> Tensor:
    """The image feature (B, D) every method and evaluation uses: a ViT's CLS token after the final norm,
    another model's pooled feature (its forward without classifier). D is `model.num_features`."""
    return forward_tokens(model, x)[:, 0] if isinstance(model, VisionTransformer) else model(x)


def _check_name(name: str, name_key: str) -> None:
    """ConfigError unless `name` is a timm model, with a tag timm knows if it has one, or an hf-hub: name."""
    if name.startswith(HF_HUB):
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"close names: {', '.join(close)}" if close else "list them with timm.list_models('vit*')"
        raise ConfigError(f"{name_key}: '{name}' is not a timm model name; {hint}")
    if split_model_name_tag(name)[1] and name not in hub_tags(name):
        raise ConfigError(f"{name_key}: timm knows no tag '{split_model_name_tag(name)[1]}' of "
                          f"{split_model_name_tag(name)[0]}; its tags: {', '.join(hub_tags(name)) or 'none'}")


def hub_tags(name: str) -> list[str]:
    """timm's `architecture.tag` names with pretrained weights for the architecture of `name`."""
    return timm.list_pretrained(f"{split_model_name_tag(name)[0]}.*")


@contextlib.contextmanager
def hub_errors(what: str, name: str, name_key: str, key: str, repo: str = "") -> Iterator[None]:
    """ConfigError for a hub file that is neither cached nor downloadable: how to get it, or to use a local
    file as `key` instead."""
    repo = repo or name.removeprefix(HF_HUB)
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        why = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise ConfigError(
            f"{name_key}: no {what} of '{name}' (hub repository {repo}) in the Hugging Face cache "
            f"{hf_constants.HF_HUB_CACHE}, and {why}; fetch them where there is network with `hf download {repo}` "
            f"(with the same HF_HOME) or run this command once online, or download the weights file and give it "
            f"as {key}=PATH"
        ) from e
    except (RepositoryNotFoundError, EntryNotFoundError, HfHubHTTPError) as e:
        raise ConfigError(f"{name_key}: the Hugging Face hub has no {what} of '{name}' ({repo}): "
                          f"{str(e).splitlines()[0]}") from e


def grid_size(vit: VisionTransformer) -> int:
    """G, the side of the (square) patch grid."""
    rows, cols = vit.patch_embed.grid_size
    if rows != cols:
        raise ValueError(f"sslfg needs a square patch grid, got {rows}x{cols}")
    return rows


@contextlib.contextmanager
def cls_attention(vit: VisionTransformer) -> Iterator[list[Tensor]]:
    """Collects each block's head-averaged CLS-to-patch attention (B, N) during a forward.

    The blocks keep their own attention path (timm's fused kernel never materialises the
    probabilities, and the explicit path would hold B·H·N² logits per block: ~1 GB at ViT-B, 224 px,
    256 images). Instead a hook on each block's `attn.qkv` takes q of the CLS token and k of every
    token from its output and computes only the CLS row, softmax(q_cls·kᵀ·scale), in float32 whatever
    the autocast: B·H·N numbers per block, without gradient (the maps only rank patches, also when they come
    from a forward that trains the encoder).
    """
    maps: list[Tensor] = []
    start = vit.num_prefix_tokens

    def reader(attn: torch.nn.Module) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _inputs: tuple[Tensor, ...], qkv: Tensor) -> None:
            b, n, _ = qkv.shape
            with torch.no_grad(), torch.autocast(qkv.device.type, enabled=False):
                q, k, _ = qkv.float().reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)  # (B, H, 1, hd), (B, H, N, hd), as the block
                probs = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, N)
            maps.append(probs[:, :, 0, start:].mean(dim=1))

        return hook

    handles = [blk.attn.qkv.register_forward_hook(reader(blk.attn)) for blk in vit.blocks]
    try:
        yield maps
    finally:
        for handle in handles:
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


