"""The pretraining methods: name -> class, and the `method` section of a pretraining recipe.

Adding a method is one module (a `MomentumMethod` subclass with its `Config`), one line in `METHODS`,
a recipe and a test file: `method.name` accepts it and `method.<name>` holds its keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sslfg.config import NON_NEGATIVE, ConfigError, bounded
from sslfg.methods.base import MomentumMethod
from sslfg.methods.byol import BYOL
from sslfg.methods.dino import DINO
from sslfg.methods.local import LocalConfig
from sslfg.methods.mocov3 import MoCoV3

METHODS: dict[str, type[MomentumMethod]] = {
    "mocov3": MoCoV3,
    "dino": DINO,
    "byol": BYOL,
}


def _method_config() -> type:
    """The dataclass of `method`: name, local, and one section per registered method."""
    fields: list[tuple[str, Any, Any]] = [
        ("name", Literal[tuple(METHODS)], dataclasses.field(default="mocov3")),
        ("local", LocalConfig, dataclasses.field(default_factory=LocalConfig)),
        # the teacher's EMA start as a half-life in optimizer steps, m0 = 2^(-1/h), replacing
        # method.<name>.momentum; a short run needs a short one or the teacher stays its random init; 0: off
        ("teacher_half_life", float, bounded(NON_NEGATIVE, 0.0)),
        *((name, cls.Config, dataclasses.field(default_factory=cls.Config)) for name, cls in METHODS.items()),
    ]
    cls = dataclasses.make_dataclass("MethodConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = "`method`: which pretraining method (`name`), its local branch and each method's own keys."
    return cls


MethodConfig = _method_config()


def build_method(model: Any, method: Any, image_size: int) -> MomentumMethod:
    """The method `method.name` (a MethodConfig) on the backbone `model` (a ModelConfig)."""
    if method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {method.name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[method.name](model, method, image_size)
