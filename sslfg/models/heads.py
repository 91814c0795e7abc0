"""MoCo v3 projector and predictor MLPs, with batch norm that spans all processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from sslfg.config import ConfigError
from sslfg.distributed import world_size


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the batch of every process.

    MoCo v3 converts its heads to SyncBatchNorm; torch's SyncBatchNorm refuses CPU tensors, so
    this one reduces the sums itself (with autograd) and works on gloo and nccl alike. With one
    process it is plain BatchNorm1d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        count = torch.full((1,), x.shape[0], dtype=torch.float32, device=x.device)
        xf = x.float()
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), count])
        stats = dist_fn.all_reduce(stats) if torch.is_grad_enabled() else _all_reduce_(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def _all_reduce_(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool, dropout: float = 0.0
) -> nn.Sequential:
    """MoCo v3's `_build_mlp`: Linear(no bias) → BN → ReLU [→ Dropout] per hidden layer, then
    Linear(no bias) and, if `last_bn`, a non-affine BN."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if not last:
            layers += [GlobalBatchNorm1d(d_out), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        elif last_bn:
            layers.append(GlobalBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def global_batch_norm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm1d replaced, in place, by a GlobalBatchNorm1d with the same settings, state and
    mode, so that heads built elsewhere (lightly's use BatchNorm1d) normalise over the batch of every process."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            bn = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn.train(child.training))
        else:
            global_batch_norm(child)
    return module


def check_batch_norm(model: nn.Module, batch_size: int, num_processes: int, fix: str = "") -> None:
    """ConfigError when a per-sample batch norm of `model` (BatchNorm1d over (B, C), as in the MoCo v3 and BYOL
    heads) would see one sample per training step: its variance is 0, which torch refuses mid-step. A
    GlobalBatchNorm1d sees the batch of every process; batch norm over tokens or pixels (ILA's) is not per
    sample. `fix`: another way out than a larger batch."""
    layers = [m for m in model.modules() if type(m) in (nn.BatchNorm1d, GlobalBatchNorm1d)]
    spans = num_processes if all(type(m) is GlobalBatchNorm1d for m in layers) else 1
    if not layers or batch_size * spans >= 2:
        return
    raise ConfigError(
        f"train.batch_size: {batch_size} image per process × {num_processes} process gives the batch norm layers "
        f"of the model's heads a single sample per step, and batch norm needs at least 2 to normalise over; set "
        f"train.batch_size=2 or more{fix}"
    )
