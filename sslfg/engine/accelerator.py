"""One Accelerator factory for every entry point, and TF32 where CUDA has it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs

from sslfg.distributed import world_size


def make_accelerator(mixed_precision: str = "no", grad_accum_steps: int = 1, timeout_s: float = 0) -> Accelerator:
    """Accelerator for plain `python`, one GPU, or `accelerate launch` with several processes.

    Without a GPU, accelerate forms a gloo process group only when told `cpu=True`; otherwise
    each launched process would silently train alone. This sets it, and checks the result.
    `timeout_s` > 0 replaces the process group's collective timeout (torch's default: 10 minutes for
    NCCL), for commands whose main process works alone while the others wait at a barrier.
    """
    world = world_size()
    # accelerate keeps its settings in process-wide singletons; a second run in the same process
    # (a study, a test) must not inherit the first one's precision or accumulation.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=world > 1 and not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))] if timeout_s > 0 else None,
    )
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched {world} processes but accelerate formed a group of {accelerator.num_processes}")
    return accelerator


@contextlib.contextmanager
def tf32(device: torch.device) -> Iterator[None]:
    """TF32 matmuls and convolutions inside the block on a CUDA device (fp32 range and accumulation, a
    10-bit mantissa on the inputs; several times fp32's speed on A100/H100), restored afterwards. The CPU
    has no TF32: nothing changes there."""
    if device.type != "cuda":
        yield
        return
    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [s.fp32_precision for s in settings]
    for s in settings:
        s.fp32_precision = "tf32"
    try:
        yield
    finally:
        for s, value in zip(settings, before, strict=True):
            s.fp32_precision = value
