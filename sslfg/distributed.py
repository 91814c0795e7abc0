"""Where this process stands in the launch: its rank and the number of processes, from one place."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed once its process group exists, else from the launcher's
    environment (`accelerate launch` sets RANK and WORLD_SIZE before any group is formed), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def world_size() -> int:
    return rank_and_world()[1]
