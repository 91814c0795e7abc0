"""Reference computations the method tests compare with, written out plainly: the CLS attention from the
blocks' weights, LoDisc's kept patches (product of the maps, threshold at rank ⌊N·ratio⌋) and masked views;
DINO's own loss, head and multi-crop wrapper (`DINOLoss`, `DINOHead`, `MultiCropWrapper`, copied)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sslfg.methods import MomentumMethod
from sslfg.models.backbone import forward_tokens


def explicit_cls_attention(vit: nn.Module, x: Tensor) -> Tensor:
    """(L, B, N): each block's head-averaged CLS-to-patch softmax(q·kᵀ·scale), from its norm1 output."""
    inputs: list[Tensor] = []
    handles = [blk.norm1.register_forward_hook(lambda m, i, o: inputs.append(o)) for blk in vit.blocks]
    forward_tokens(vit, x)
    for h in handles:
        h.remove()
    maps = []
    for blk, h in zip(vit.blocks, inputs, strict=True):
        b, n, d = h.shape
        heads = blk.attn.num_heads
        q, k, _ = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).unbind(2)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) * (d // heads) ** -0.5
        maps.append(logits.softmax(-1)[:, :, 0, 1:].mean(1))
    return torch.stack(maps)


def reference_kept(vit: nn.Module, x: Tensor, keep_ratio: float) -> list[list[int]]:
    """The reference's mask_att_idex: product of the attention maps over layers; per sample keep the
    patches above the value at rank int(N·ratio) of the descending order."""
    product = explicit_cls_attention(vit, x).double().prod(0)
    kept = []
    for row in product:
        threshold = row.sort(descending=True).values[int(len(row) * keep_ratio)]
        kept.append([j for j in range(len(row)) if row[j] > threshold])
    return kept


def reference_zero_fill(x: Tensor, kept: list[list[int]], patch: int) -> Tensor:
    """Every patch not kept set to zero, one sample and one patch at a time."""
    out = x.clone()
    g = x.shape[-1] // patch
    for b, keep in enumerate(kept):
        for p in range(g * g):
            if p not in keep:
                r, c = divmod(p, g)
                out[b, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 0
    return out


def reference_drop_tokens_cls(vit: nn.Module, x: Tensor, kept: list[list[int]]) -> Tensor:
    """CLS after the final norm when only the kept patch tokens (with their position embeddings) enter the blocks."""
    patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]
    cls = vit.cls_token + vit.pos_embed[:, :1]
    out = []
    for b, keep in enumerate(kept):
        tokens = torch.cat([cls[0], patches[b, keep]])[None]
        for blk in vit.blocks:
            tokens = blk(tokens)
        out.append(vit.norm(tokens)[0, 0])
    return torch.stack(out)


@torch.no_grad()
def outputs(method: MomentumMethod, x1: Tensor, x2: Tensor, view: str = "zero_fill", keep_ratio: float = 0.30
            ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[list[int]]]:
    """Student outputs s1, s2, teacher outputs t1, t2, teacher outputs tm1, tm2 of the explicitly masked
    views (kept patches from the reference's formula), each view on its own, and the kept patches."""
    enc, head = method.momentum_encoder, method.momentum_projector
    s = [method.predictor(method.projector(forward_tokens(method.encoder, x)[:, 0])) for x in (x1, x2)]
    t = [head(forward_tokens(enc, x)[:, 0]) for x in (x1, x2)]
    kept = [reference_kept(enc, x, keep_ratio) for x in (x1, x2)]
    if view == "zero_fill":
        tm = [head(forward_tokens(enc, reference_zero_fill(x, k, method.patch_size))[:, 0]) for x, k in zip(
            (x1, x2), kept, strict=True)]
    else:
        tm = [head(reference_drop_tokens_cls(enc, x, k)) for x, k in zip((x1, x2), kept, strict=True)]
    return s, t, tm, kept[0] + kept[1]


def reference_ctr(q: Tensor, k: Tensor, t: float) -> Tensor:
    """MoCo v3's ctr: -1/B Σ_i log( exp(q̂_i·k̂_i/T) / Σ_j exp(q̂_i·k̂_j/T) ) × 2T, with plain loops."""
    qn = [qi / qi.norm() for qi in q.double()]
    kn = [ki / ki.norm() for ki in k.double()]
    total = 0.0
    for i, qi in enumerate(qn):
        logits = [float(qi @ kj) / t for kj in kn]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return torch.tensor(total / len(qn) * 2 * t, dtype=torch.float64)


# facebookresearch/dino, main_dino.py (commit 144f70567a6ff853b9ea44503ba37fdcf8ca41fb), verbatim; its
# update_center all-reduces, so a test on one process replaces dist.all_reduce and dist.get_world_size
class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # we apply a warm up for the teacher temperature because
        # a too high temperature makes the training instable at the beginning
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp,
                        teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))

    def forward(self, student_output, teacher_output, epoch):
        """
        Cross-entropy between softmax outputs of the teacher and student networks.
        """
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)

        # teacher centering and sharpening
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)

        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    # we skip cases where student and teacher operate on the same view
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """
        Update center used for teacher output.
        """
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        dist.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * dist.get_world_size())

        # ema update
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# facebookresearch/dino, vision_transformer.py (commit 7c446df5b9f45747937fb0d72314eb9f7b66930a), verbatim; its
# trunc_normal_ is utils.trunc_normal_, the same truncated normal as torch's (the tests copy the weights anyway)
trunc_normal_ = nn.init.trunc_normal_


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256):  # noqa: E501
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x


# facebookresearch/dino, utils.py (commit 7c446df5b9f45747937fb0d72314eb9f7b66930a), verbatim
class MultiCropWrapper(nn.Module):
    """
    Perform forward pass separately on each resolution input.
    The inputs corresponding to a single resolution are clubbed and single
    forward is run on the same resolution inputs. Hence we do several
    forward passes = number of different resolutions used. We then
    concatenate all the output features and run the head forward on these
    concatenated features.
    """
    def __init__(self, backbone, head):
        super(MultiCropWrapper, self).__init__()  # noqa: UP008
        # disable layers dedicated to ImageNet labels classification
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        # convert to list
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]),
            return_counts=True,
        )[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx: end_idx]))
            # The output is a tuple with XCiT model. See:
            # https://github.com/facebookresearch/xcit/blob/master/xcit.py#L404-L405
            if isinstance(_out, tuple):
                _out = _out[0]
            # accumulate outputs
            output = torch.cat((output, _out))
            start_idx = end_idx
        # Run the head forward on the concatenated features.
        return self.head(output)
