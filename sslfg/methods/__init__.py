"""The pretraining methods: name -> class. Their recipe keys (`method`) are `sslfg.method_config`'s, without torch.

Adding a method is one module (a `MomentumMethod` subclass, or a `SiameseMethod` one for a method without a
teacher, with its `Config`), its `Config` dataclass and one line in
`sslfg.method_config.CONFIGS`, one line in `METHODS`, a recipe and a test file: `method.name` accepts it
and `method.<name>` holds its keys.
"""

from __future__ import annotations

from typing import Any

from sslfg.config import ConfigError
from sslfg.methods.barlowtwins import BarlowTwins
from sslfg.methods.base import Method, MomentumMethod
from sslfg.methods.byol import BYOL
from sslfg.methods.dino import DINO
from sslfg.methods.mocov3 import MoCoV3
from sslfg.methods.siamese import SiameseMethod
from sslfg.methods.simclr import SimCLR
from sslfg.methods.vicreg import VICReg

__all__ = ["METHODS", "Method", "MomentumMethod", "SiameseMethod", "build_method"]

METHODS: dict[str, type[Method]] = {
    "mocov3": MoCoV3,
    "dino": DINO,
    "byol": BYOL,
    "simclr": SimCLR,
    "barlowtwins": BarlowTwins,
    "vicreg": VICReg,
}


def build_method(model: Any, method: Any, image_size: int) -> Method:
    """The method `method.name` (a MethodConfig) on the backbone `model` (a ModelConfig)."""
    if method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {method.name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[method.name](model, method, image_size)
