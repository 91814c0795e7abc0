"""One Accelerator factory for every entry point."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState


def make_accelerator(mixed_precision: str = "no", grad_accum_steps: int = 1) -> Accelerator:
    """Accelerator for plain `python`, one GPU, or `accelerate launch` with several processes.

    Without a GPU, accelerate forms a gloo process group only when told `cpu=True`; otherwise
    each launched process would silently train alone. This sets it, and checks the result.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate keeps its settings in process-wide singletons; a second run in the same process
    # (a study, a test) must not inherit the first one's precision or accumulation.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
    )
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched {world} processes but accelerate formed a group of {accelerator.num_processes}")
    return accelerator
