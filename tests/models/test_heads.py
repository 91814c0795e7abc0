from __future__ import annotations

import torch

from sslfg.models.heads import GlobalBatchNorm1d


def test_global_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    ours, ref = GlobalBatchNorm1d(5), torch.nn.BatchNorm1d(5)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
