"""Sample order and augmentation randomness as pure functions of (seed, epoch, index).

The training loader does not depend on any process's RNG state, which gives two guarantees:
resuming mid-epoch replays exactly the batches and augmentations an uninterrupted run would
have seen, and W processes with batch B see the same global batches as one process with W·B.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sslfg.config import ConfigError

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, epoch) over the seed space


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * _MIX + index) % (1 << 63)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of each global batch, as (index, sample_seed) pairs.

    Epoch e shuffles all indices with a generator seeded by (seed, e); global batch j is
    perm[j·B·W : (j+1)·B·W] and process r takes its r-th slice of B. Incomplete global batches
    are dropped, and `batches_per_epoch` is rounded down to a multiple of `multiple_of` (the
    gradient accumulation steps) so every epoch ends on an optimizer step.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 multiple_of: int = 1) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = num_samples // (batch_size * world_size) // multiple_of * multiple_of
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size: {num_samples} training images are fewer than one optimizer step needs "
                f"(train.batch_size {batch_size} × {world_size} processes × {multiple_of} accumulation steps)"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch; `start_batch` skips batches already trained on (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        perm = torch.randperm(self.num_samples, generator=g).tolist()
        global_batch = self.batch_size * self.world_size
        for j in range(self.start_batch, self.batches_per_epoch):
            start = j * global_batch + self.rank * self.batch_size
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in perm[start : start + self.batch_size]]


class SeededDataset(Dataset):
    """Wraps a dataset so that item (index, seed) is produced with the CPU generator seeded by
    `seed`, and the caller's RNG state restored afterwards."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        # Only the CPU generator: transforms draw from it, and this costs 2 µs where
        # fork_rng + torch.manual_seed (which also seeds every CUDA device) costs 120 µs.
        index, seed = item
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)


def seeded_loader(
    dataset: Dataset, sampler: EpochBatchSampler, num_workers: int, pin_memory: bool = False
) -> DataLoader:
    """The training DataLoader: `sampler`'s (index, seed) batches of `dataset`, each item made under
    its seed. Its own generator keeps it from drawing on the global RNG, so resume stays exact."""
    return DataLoader(SeededDataset(dataset), batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, generator=torch.Generator())
