"""Methods without a teacher (METHODS §6): one encoder and one projector see both views and the method's loss
compares the two projections (SimCLR, Barlow Twins, VICReg). No EMA and no stop-gradient side.

With the local branch on, the kept patches come from the encoder's own CLS attention, read in the same forward
pass and without gradient (the attention only ranks the patches, as the teacher's does for the momentum methods),
and the masked views go through the same encoder and projector with gradient: the method is symmetric, so both
sides of each local pair train.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sslfg.config import ConfigError
from sslfg.methods.base import Method
from sslfg.models.backbone import cls_attention, pooled_feature

if TYPE_CHECKING:
    from sslfg.schema import ModelConfig


class SiameseMethod(Method):
    """Encoder → projector on both views. forward(x1, x2) returns {"loss", "loss_global"} and, with the local branch
    on, "loss_local": loss_global = `view_loss(z1, z2)`, loss_local = ½(view_loss(z1, m2) + view_loss(z2, m1)) with
    m the projections of the masked views (the same scale as the global term), loss = global + method.local.weight
    · local. A subclass gives its `Config`, `build_projector` and `view_loss`."""

    def __init__(self, model: ModelConfig, method: Any, image_size: int) -> None:
        if method.teacher_half_life:
            raise ConfigError(f"method.teacher_half_life: {method.name} has no teacher (no EMA) whose half-life it "
                              f"could set, got {method.teacher_half_life:g}; remove the key (or set it to 0), or "
                              f"use a method with a teacher (mocov3, byol, dino)")
        super().__init__(model, method, image_size)
        self.projector = self.build_projector(self.encoder.num_features)

    def build_projector(self, dim: int) -> nn.Module:
        """The projector on the pooled feature of width `dim`."""
        raise NotImplementedError

    def view_loss(self, z1: Tensor, z2: Tensor) -> Tensor:
        """The method's loss of the projections (B, K) of two views of the same images."""
        raise NotImplementedError

    @property
    def attention_encoder(self) -> nn.Module:
        return self.encoder

    def project(self, features: Tensor) -> list[Tensor]:
        """The projector on the features of both views (2B, D), per view, so that its batch norm sees one view as
        in Barlow Twins' and VICReg's code."""
        return [self.projector(f) for f in features.chunk(2)]

    def masked_outputs(self, x: Tensor, keep_idx: Tensor) -> list[Tensor]:
        """The projections of the masked views, with gradient (no stop-gradient side)."""
        return self.project(self.local.masked_cls(self.encoder, x, keep_idx))

    def pair_loss(self, outputs: list[Tensor], masked: list[Tensor]) -> Tensor:
        return (self.view_loss(outputs[0], masked[1]) + self.view_loss(outputs[1], masked[0])) / 2

    def forward(self, x1: Tensor, x2: Tensor) -> dict[str, Tensor]:
        x = torch.cat([x1, x2])
        with cls_attention(self.encoder) if self.local.on else contextlib.nullcontext([]) as maps:
            features = pooled_feature(self.encoder, x)
        z = self.project(features)
        loss_global = self.view_loss(*z)
        out = {"loss_global": loss_global, "loss": loss_global}
        if self.local.on:
            loss_local = self.local.loss(self, z, x, self.local.keep(maps))
            out.update(loss_local=loss_local, loss=loss_global + self.local.cfg.weight * loss_local)
        return out
