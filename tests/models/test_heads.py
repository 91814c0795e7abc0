from __future__ import annotations

import torch

from sslfg.models.heads import GlobalBatchNorm1d, global_batch_norm


def test_global_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    ours, ref = GlobalBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_global_batch_norm_swaps_every_batchnorm_keeping_state() -> None:
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm1d(8, affine=False)))
    head(torch.randn(5, 4))  # running statistics that the swap must keep
    before = {k: v.clone() for k, v in head.state_dict().items()}
    x = torch.randn(6, 4)
    expected = head.eval()(x)
    swapped = global_batch_norm(head)
    kinds = [type(m) for m in swapped.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert kinds == [GlobalBatchNorm1d, GlobalBatchNorm1d]
    assert not swapped[2][1].affine and swapped.state_dict().keys() == before.keys()
    assert all(torch.equal(swapped.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(swapped(x), expected)
