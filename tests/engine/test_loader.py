from __future__ import annotations

import pytest
import torch

from sslfg.config import ConfigError
from sslfg.data.loader import EpochBatchSampler, SeededDataset


def test_two_processes_split_each_global_batch_of_one_process() -> None:
    one = list(EpochBatchSampler(50, 8, seed=3))
    r0 = list(EpochBatchSampler(50, 4, rank=0, world_size=2, seed=3))
    r1 = list(EpochBatchSampler(50, 4, rank=1, world_size=2, seed=3))
    assert len(one) == len(r0) == len(r1) == 6  # 50 // 8, incomplete global batch dropped
    for a, b, c in zip(one, r0, r1, strict=True):
        assert a == b + c


def test_epochs_differ_and_resume_replays_the_tail() -> None:
    s = EpochBatchSampler(40, 4, seed=0, multiple_of=3)
    assert len(s) == 9  # 10 batches rounded down to a multiple of 3
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start_batch=5)
    assert list(s) == full[5:] and len(s) == 4
    s.set_epoch(2)
    assert list(s) != full
    assert sorted(i for batch in full for i, _ in batch) == sorted(set(i for batch in full for i, _ in batch))


def test_too_small_dataset_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        EpochBatchSampler(10, 8, world_size=2)


class _Noise(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3)


def test_seeded_dataset_is_reproducible_and_leaves_global_rng_alone() -> None:
    ds = SeededDataset(_Noise())
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a, b = ds[(1, 123)], ds[(1, 123)]
    assert torch.equal(a, b) and not torch.equal(a, ds[(1, 124)])
    assert torch.equal(torch.rand(1), expected_next)
