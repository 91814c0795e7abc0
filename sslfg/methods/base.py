"""What every pretraining method shares (`Method`: its encoder and local branch, its step, parameter groups and
after-update work) and what every momentum (student–teacher) method adds (`MomentumMethod`): the teacher encoder
and heads, one EMA update per applied optimizer step, a teacher pass that can also read every block's CLS
attention, and the loss assembly with the optional local branch (METHODS §1, §6). Methods without a teacher are
`sslfg.methods.siamese`'s.

A momentum method subclass gives its `Config` (the `method.<name>` keys), its heads (`build_heads`) and its
pair loss (`pair_loss`); everything else is here. State-dict names are the same for every method:
`encoder`, `projector`, `predictor` (the student), `momentum_encoder`, `momentum_projector` (the
teacher), so checkpoints, `sslfg.load_backbone` and the figures read any of them.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from lightly.models.utils import update_momentum
from timm.layers import DropPath, PatchDropout
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslfg.engine.schedules import cosine_schedule
from sslfg.methods.local import LocalBranch
from sslfg.models.backbone import cls_attention, grid_size, pooled_feature, require_vit, timm_kwargs
from sslfg.weights import create_backbone

if TYPE_CHECKING:
    from sslfg.schema import ModelConfig


def without_noise(module: nn.Module) -> nn.Module:
    """`module` with every dropout, drop path and patch dropout set to 0 (it stays in training mode, so its
    batch norm still uses batch statistics): the teacher's targets and attention are functions of its
    input, as in DINO's teacher (built without drop path), not samples (METHODS §6)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, PatchDropout):
            m.prob = 0.0
    return module


class Method(nn.Module):
    """A pretraining method's step, which the generic loop runs (`sslfg.pretrain`): `forward(*views)` takes the
    views of a batch (B, 3, H, W) each and returns its losses ({"loss", ...more to log}); before each forward
    `set_step` gets that step's values of `schedules`; after each optimizer step `after_update` does the method's
    own work (the EMA, DINO's centre); the optimizer trains `param_groups`.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    # False: biases and norms (every 1-D tensor) get no weight decay, as in DINO's and BYOL's code
    decay_biases_and_norms: ClassVar[bool] = True
    multi_crop: ClassVar[bool] = False  # True: its loss uses local views besides the two global ones (DINO)

    def __init__(self, model: ModelConfig, method: Any, image_size: int) -> None:
        """The trained encoder (`encoder`, the backbone a run exports) and the local branch (`local`)."""
        super().__init__()
        self.cfg = getattr(method, self.name)  # this method's own section, method.<name>
        kwargs = timm_kwargs(image_size, model.patch_size, model.kwargs)
        self.encoder, self.timm_kwargs = create_backbone(model.name, kwargs, model.weights, model.drop_path_rate,
                                                         pretrained=model.pretrained)
        self.vit = isinstance(self.encoder, VisionTransformer)  # else only the global method (pooled feature)
        if method.local.weight > 0:
            require_vit(self.encoder, model.name, "model.name", "LoDisc's local branch (method.local.weight > 0)",
                        "set method.local.weight=0 for the global method alone, or use a ViT")
        self.patch_size = image_size // grid_size(self.encoder) if self.vit else 0
        self.local = LocalBranch(method.local, self.patch_size, len(self.encoder.blocks) if self.vit else 0)

    @property
    def attention_encoder(self) -> nn.Module:
        """The encoder whose CLS attention picks the kept patches (the teacher's, or the encoder's own)."""
        raise NotImplementedError

    def kept_patches(self, x: Tensor) -> Tensor:
        """The patches the local branch keeps for images x, (B, K) ascending (also with the branch off)."""
        with torch.no_grad(), cls_attention(self.attention_encoder) as maps:
            pooled_feature(self.attention_encoder, x)
        return self.local.keep(maps)

    def masked_outputs(self, x: Tensor, keep_idx: Tensor) -> list[Tensor]:
        """The outputs the local branch compares with: those of the views x (2B, ...) with only the patches
        keep_idx (2B, K) left, per view."""
        raise NotImplementedError

    def pair_loss(self, outputs: list[Tensor], masked: list[Tensor]) -> Tensor:
        """The loss between outputs [o1, o2] (and the local views' of a `multi_crop` method) and other outputs
        [m1, m2] of the other view: the pairs (o1, m2) and (o2, m1) (and each local view's with both)."""
        raise NotImplementedError

    def schedules(self, total_steps: int, per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step values this method needs besides lr and weight decay (logged with them)."""
        return {}

    def set_step(self, values: dict[str, float]) -> None:
        """Called before each step's forward with that step's scheduled values (DINO's teacher temperature)."""

    def after_update(self, values: dict[str, float], applied: bool) -> None:
        """Called once per optimizer step, after it, with its scheduled values; `applied` is False when fp16's
        GradScaler skipped it (the weights did not move)."""

    def frozen_epochs(self) -> dict[str, int]:
        """{part of a parameter name: epochs}: those parameters do not train during the first epochs (DINO's last
        layer); the loop drops their gradients after clipping."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups, in `named_parameters` order: `wd_scale` 0 for biases and
        1-D tensors unless `decay_biases_and_norms` (DINO's `utils.get_params_groups` rule), `frozen_epochs` from
        `frozen_epochs()`; one group when neither applies."""
        frozen, groups = self.frozen_epochs(), {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                no_decay = not self.decay_biases_and_norms and (name.endswith(".bias") or p.ndim == 1)
                epochs = max((e for part, e in frozen.items() if part in name), default=0)
                groups.setdefault((0.0 if no_decay else 1.0, epochs), []).append(p)
        return [{"params": ps, "wd_scale": wd, "frozen_epochs": epochs} for (wd, epochs), ps in groups.items()]

    def summary(self, schedules: dict[str, np.ndarray]) -> dict[str, Any]:
        """Facts for the start-up summary."""
        return {}


class MomentumMethod(Method):
    """Student (encoder → projector → predictor) and teacher (EMA of encoder and projector).

    forward(x1, x2) takes two views (B, 3, H, W) and returns {"loss", "loss_global"} and, with the
    local branch on, "loss_local": loss = global + method.local.weight · local, only tensors the loss
    is made of (the kept patches come from `kept_patches`).
    """

    joint_heads: ClassVar[bool] = False  # True: the heads see every view in one batch (`per_view`)

    def __init__(self, model: ModelConfig, method: Any, image_size: int) -> None:
        super().__init__(model, method, image_size)
        self.teacher_half_life = method.teacher_half_life
        self.projector, self.predictor = self.build_heads(self.encoder.num_features)
        self.momentum_encoder = without_noise(copy.deepcopy(self.encoder))
        self.momentum_projector = without_noise(copy.deepcopy(self.projector))
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def build_heads(self, dim: int) -> tuple[nn.Module, nn.Module]:
        """(projector, predictor) on the CLS of width `dim`; the teacher gets a copy of the projector only
        (nn.Identity for a predictor the method does not have)."""
        raise NotImplementedError

    def momentum_start(self) -> float:
        """m0: 2^(-1/h) for a teacher half-life of h steps (after h steps at m0 the teacher's past weighs
        half), else method.<name>.momentum."""
        h = self.teacher_half_life
        return 0.5 ** (1 / h) if h > 0 else self.cfg.momentum

    def schedules(self, total_steps: int, per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step values this method needs besides lr and weight decay (logged with them): the EMA
        momentum, from `momentum_start()` to 1 on a half cosine."""
        return {"momentum": cosine_schedule(self.momentum_start(), 1.0, total_steps)}

    def after_update(self, values: dict[str, float], applied: bool) -> None:
        """The EMA, only after an applied optimizer step."""
        if applied:
            self.update_momentum(values["momentum"])

    def summary(self, schedules: dict[str, np.ndarray]) -> dict[str, Any]:
        # the weight the teacher's initial values keep at the end (∏ m): near 1, the init picks LoDisc's patches
        return {"teacher.momentum_start": self.momentum_start(),
                "teacher.init_share": float(np.prod(schedules["momentum"]))}

    def observe_teacher(self, teacher: list[Tensor]) -> None:
        """Called after the loss of each forward with the teacher outputs of both views (DINO's centre)."""

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """p_m ← m·p_m + (1−m)·p for encoder and projector (never the predictor)."""
        update_momentum(self.encoder, self.momentum_encoder, m)
        update_momentum(self.projector, self.momentum_projector, m)

    def student(self, *views: Tensor) -> list[Tensor]:
        """The student's output on each view. One encoder pass per run of same-sized views (the global views, then
        the local ones, as DINO's MultiCropWrapper; LayerNorm is per token, so for a ViT this equals a pass per
        view; a CNN's batch norm sees the views of the pass, as in lightly's and solo-learn's concatenated
        passes); the heads run per view so that their batch norm sees one view, as in MoCo v3 and BYOL, or with
        `joint_heads` once on every view, as DINO's MultiCropWrapper."""
        features: list[Tensor] = []
        for _, same in itertools.groupby(views, key=lambda v: v.shape[-2:]):
            same = list(same)
            features += pooled_feature(self.encoder, torch.cat(same)).chunk(len(same))
        return self.per_view(lambda f: self.predictor(self.projector(f)), features)

    def per_view(self, head: Callable[[Tensor], Tensor], features: list[Tensor]) -> list[Tensor]:
        """`head` on each view's features: one call per view, or with `joint_heads` one on all of them (the same
        unless the head has batch norm)."""
        if self.joint_heads:
            return list(head(torch.cat(features)).chunk(len(features)))
        return [head(f) for f in features]

    @torch.no_grad()
    def teacher_cls(self, x: Tensor, attention: bool) -> tuple[Tensor, list[Tensor]]:
        """The teacher encoder's CLS (B, D) (pooled feature) and, from the same pass if asked, every block's
        CLS-to-patch attention [(B, N)] × L (else [])."""
        with cls_attention(self.momentum_encoder) if attention else contextlib.nullcontext([]) as maps:
            cls = pooled_feature(self.momentum_encoder, x)
        return cls, maps

    @torch.no_grad()
    def teacher_outputs(self, cls: Tensor) -> list[Tensor]:
        """The teacher head on the CLS of both views (2B, D), per view (`per_view`)."""
        return self.per_view(self.momentum_projector, list(cls.chunk(2)))

    @property
    def attention_encoder(self) -> nn.Module:
        return self.momentum_encoder

    @torch.no_grad()
    def masked_outputs(self, x: Tensor, keep_idx: Tensor) -> list[Tensor]:
        """The teacher's outputs of the masked views, without gradient."""
        return self.teacher_outputs(self.local.masked_cls(self.momentum_encoder, x, keep_idx))

    def forward(self, x1: Tensor, x2: Tensor, *local_views: Tensor) -> dict[str, Tensor]:
        """The loss of the two global views x1, x2 and any local views (multi-crop, `multi_crop` methods): the
        student sees every view, the teacher and the local branch the global ones."""
        student = self.student(x1, x2, *local_views)
        x = torch.cat([x1, x2])
        cls, maps = self.teacher_cls(x, attention=self.local.on)
        teacher = self.teacher_outputs(cls)
        loss_global = self.pair_loss(student, teacher)
        out = {"loss_global": loss_global, "loss": loss_global}
        if self.local.on:
            loss_local = self.local.loss(self, student[:2], x, self.local.keep(maps))
            out.update(loss_local=loss_local, loss=loss_global + self.local.cfg.weight * loss_local)
        self.observe_teacher(teacher)
        return out
