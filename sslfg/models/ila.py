"""ILA: down-sampling inter-layer adapters for parameter-efficient fine-tuning (METHODS §3).

`attach_ila(vit, variant)` inserts adapters into a timm `VisionTransformer` in place and freezes
the backbone. Adapters go INTO `vit.blocks` (a new nn.Sequential [block, adapter, block, ...]), so
every path that runs `vit.blocks` (timm's forward, `forward_tokens`, GLSim's crop pass) uses them
and the token count shrinks inside the blocks: G²+1 → (G−2)²+1 → (G−4)²+1. `patch_embed`,
`_pos_embed` run before the blocks on the input grid; `vit.norm` after them is per token.

Variants:
- "ila": a down-sampling adapter after each block in `positions` (default depth/3 − 1 and
  2·depth/3 − 1: 3 and 7 of 12).
- "ila+": also a non-down-sampling adapter (same grid, x + adapter(x)) after each block in
  `plus_positions` (default: every block not in `positions`, the last one included).
- "ila++": the reference's ILA++ (`--adapter adapter --ila --ila_locs`): the down-sampling adapters
  of "ila" and a parallel bottleneck beside attention and beside the MLP in every block (`blk.attn`
  and `blk.mlp` become `ParallelAdapter`s around the originals), WITHOUT the ila+ adapters
  (`plus_positions` adds them).

As in the reference, the frozen blocks keep their hidden dropout while training: `dropout` (0.1,
the reference's hidden_dropout_prob) is set on each block's attention output projection and MLP
output, and acts on every adapter branch. Trainable parameters at ViT-B/16 224, CLS and head
aside: 40,464 (ila), 173,664 (ila+), 354,000 (ila++). The reference code counts 16 more per
inter-layer adapter (40,496 / 173,856 / 354,032): biases on its down projection and depthwise
conv, which the BN right after them cancels (their gradient is zero), so we leave them out.

Trainable afterwards: the adapters and the CLS token (plus a timm classifier `vit.head` if the
model has one); the fine-tune head added later stays trainable as any new module. Attaching
renames the state-dict keys after the first adapter (blocks are renumbered, ila++ adds
`.module`): load pretrained weights into the ViT before attaching, checkpoints after.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslfg.models.backbone import grid_size

VARIANTS = ("ila", "ila+", "ila++")
RESIDUAL_INIT_STD = 1e-3


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over tokens (B, N, C): statistics per channel over the batch and all N tokens (CLS included)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class InterLayerAdapter(nn.Module):
    """One ILA adapter between two blocks: tokens (B, 1 + G², D) → (B, 1 + G'², D), CLS first.

    Down-sampling (G' = G − 2): out = shortcut(x) + dropout(bottleneck(x)), where the shortcut is a
    depthwise 3×3 valid conv over the D-channel patch map (no bias, weights N(1, 0.001): at init it
    sums each 3×3 neighbourhood) and leaves the CLS token unchanged.
    Not down-sampling (G' = G, ILA+): out = x + dropout(bottleneck(x)), the residual-adapter form;
    the bottleneck's depthwise conv then pads by 1.

    Bottleneck: Linear(D→r) → BN → GELU; patches as an (B, r, G, G) map: depthwise 3×3 conv → BN2d
    → GELU → pointwise 1×1 conv; CLS: Linear(r→r) (a 1×1 conv on a 1×1 map); then all tokens
    [CLS, patches]: BN → GELU → Linear(r→D). The token BNs pool the batch and every token (CLS and
    patches), as the reference code's BatchNorm1d over (B, r, N). Layers followed by BN carry no bias:
    its mean subtraction would cancel it.
    """

    def __init__(self, dim: int, width: int = 8, downsample: bool = True, dropout: float = 0.1) -> None:
        super().__init__()
        self.downsample = downsample
        self.down = nn.Linear(dim, width, bias=False)
        self.norm_down = TokenBatchNorm(width)
        self.conv_dw = nn.Conv2d(width, width, 3, padding=0 if downsample else 1, groups=width, bias=False)
        self.norm_dw = nn.BatchNorm2d(width)
        self.conv_pw = nn.Conv2d(width, width, 1)
        self.cls_proj = nn.Linear(width, width)
        self.norm_up = TokenBatchNorm(width)
        self.up = nn.Linear(width, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.reduce = nn.Conv2d(dim, dim, 3, groups=dim, bias=False) if downsample else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases (as the reference), near-one shortcut conv."""
        for layer in (self.down, self.conv_dw, self.conv_pw, self.cls_proj, self.up):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        if self.reduce is not None:
            nn.init.normal_(self.reduce.weight, mean=1.0, std=RESIDUAL_INIT_STD)

    def bottleneck(self, x: Tensor) -> Tensor:
        """(B, 1 + G², D) → (B, 1 + G'², D), before dropout."""
        h = self.act(self.norm_down(self.down(x)))
        b, n, r = h.shape
        g = patch_side(n)
        grid = h[:, 1:].transpose(1, 2).reshape(b, r, g, g)
        patches = self.conv_pw(self.act(self.norm_dw(self.conv_dw(grid)))).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_proj(h[:, :1]), patches], dim=1)
        return self.up(self.act(self.norm_up(h)))

    def shortcut(self, x: Tensor) -> Tensor:
        """The residual branch: x itself, or (B, 1 + (G−2)², D) with the CLS token unchanged when down-sampling."""
        if self.reduce is None:
            return x
        b, n, d = x.shape
        g = patch_side(n)
        grid = x[:, 1:].transpose(1, 2).reshape(b, d, g, g)
        return torch.cat([x[:, :1], self.reduce(grid).flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1 + G², D) → (B, 1 + G'², D)."""
        return self.shortcut(x) + self.drop(self.bottleneck(x))


def patch_side(num_tokens: int) -> int:
    """G for tokens [CLS, G² patches]; a clear error when the patches do not form a square grid."""
    g = math.isqrt(num_tokens - 1)
    if g * g != num_tokens - 1:
        raise ValueError(f"ILA adapters need [CLS, G*G patch tokens], got {num_tokens} tokens")
    return g


class ParallelAdapter(nn.Module):
    """`module(x) + dropout(adapter(x))` with adapter = Linear(D→r) → GELU → Linear(r→D), as the reference's
    `Adapter` on its convpass path: both projections Xavier-uniform, biases zero.

    Wraps a block's `attn` or `mlp` (ILA++), so the block computes the reference's parallel form
    x + drop_path(ls(attn(norm1(x)) + dropout(adapter(norm1(x))))), likewise for the MLP, without copying
    timm's Block. x (B, N, D) → (B, N, D); extra arguments go to `module`.
    """

    def __init__(self, module: nn.Module, dim: int, width: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.module = module
        self.adapter = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))
        self.drop = nn.Dropout(dropout)
        for layer in (self.adapter[0], self.adapter[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        return self.module(x, *args, **kwargs) + self.drop(self.adapter(x))


def default_positions(depth: int) -> list[int]:
    """The blocks after which ILA down-samples: depth/3 − 1 and 2·depth/3 − 1 (3 and 7 for 12 blocks)."""
    if depth < 3:
        raise ValueError(f"ILA's default positions need at least 3 blocks, got {depth}: pass positions")
    return [depth // 3 - 1, 2 * depth // 3 - 1]


def attach_ila(
    model: VisionTransformer,
    variant: str = "ila",
    width: int = 8,
    positions: Sequence[int] | None = None,
    dropout: float = 0.1,
    plus_positions: Sequence[int] | None = None,
) -> VisionTransformer:
    """Adds ILA adapters to a timm ViT in place, freezes the rest but the CLS token, and returns it.

    positions: blocks (0-based) followed by a down-sampling adapter; default `default_positions`.
    plus_positions (ila+, ila++): blocks followed by a non-down-sampling adapter; default every
    block not in `positions` for ila+, none for ila++. width: the bottleneck width r. dropout: the
    reference's hidden dropout, on every adapter branch and on the frozen blocks' attention and MLP
    outputs. Original parameters get requires_grad False except `cls_token` (and a timm classifier
    `head`, Identity for models built by create_vit); adapters are trainable.
    """
    if variant not in VARIANTS:
        raise ValueError(f"ILA variant must be one of {VARIANTS}, got '{variant}'")
    if model.cls_token is None or model.num_prefix_tokens != 1:
        raise ValueError("ILA needs a ViT with a class token and no other prefix tokens (registers)")
    if any(isinstance(m, (InterLayerAdapter, ParallelAdapter)) for m in model.blocks.modules()):
        raise ValueError("the model's blocks already hold adapters: attach_ila once per model")
    depth = len(model.blocks)
    positions = sorted(default_positions(depth) if positions is None else positions)
    if variant == "ila" and plus_positions:
        raise ValueError("plus_positions needs variant 'ila+' or 'ila++'")
    if variant == "ila+" and plus_positions is None:
        plus: Sequence[int] = [i for i in range(depth) if i not in positions]
    else:
        plus = plus_positions or []
    for name, where in (("positions", positions), ("plus_positions", plus)):
        if len(set(where)) != len(where) or any(not 0 <= i < depth for i in where):
            raise ValueError(f"ILA {name} must be distinct block indices in [0, {depth}), got {list(where)}")
    if set(positions) & set(plus):
        raise ValueError(f"ILA positions {positions} and plus_positions {list(plus)} overlap")
    if grid_size(model) - 2 * len(positions) < 1:
        raise ValueError(f"{len(positions)} down-sampling adapters shrink a {grid_size(model)}-patch grid to nothing")

    for p in model.parameters():
        p.requires_grad_(False)
    model.cls_token.requires_grad_(True)
    model.head.requires_grad_(True)

    dim = model.embed_dim
    layers: list[nn.Module] = []
    for i, blk in enumerate(model.blocks):
        blk.attn.proj_drop.p = blk.mlp.drop2.p = dropout  # the reference's hidden dropout on each branch output
        if variant == "ila++":
            blk.attn = ParallelAdapter(blk.attn, dim, width, dropout)
            blk.mlp = ParallelAdapter(blk.mlp, dim, width, dropout)
        layers.append(blk)
        if i in positions or i in plus:
            layers.append(InterLayerAdapter(dim, width, downsample=i in positions, dropout=dropout))
    model.blocks = nn.Sequential(*layers)
    return model


def final_grid(vit: VisionTransformer) -> int:
    """Side of the patch grid after the blocks: G − 2 per down-sampling adapter in `vit.blocks`.

    Final-grid cell (r, c) is the output of k valid 3×3 convs, so it sees input patches rows
    r..r + 2k, columns c..c + 2k (centre r + k, c + k), with k = (G − final_grid) / 2.
    """
    ds = sum(isinstance(m, InterLayerAdapter) and m.downsample for m in vit.blocks)
    return grid_size(vit) - 2 * ds


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
