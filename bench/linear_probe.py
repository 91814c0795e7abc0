"""The fast linear probe's sweep: L heads as one joined matmul (sslfg) against a batched matmul of L thin products.

`sslfg.evaluation.linear.train_heads` trains one Linear(D, C) head per lr at once. Until 2026-12-06 its forward was
`baddbmm` over (L, B, D) × (L, D, C); now the heads are joined side by side, (B, D) × (D, L·C). This times both on
random features of the two sizes a study probes: a backbone's CLS (D 128) and raw pixels of an 84 px image (D 7,056),
9,000 training samples, 10 classes, 8 heads (the default lr grid), batch 256, interleaved rounds, and prints
seconds per epoch and the batched/joined ratio (median and min–max over rounds).

    python bench/linear_probe.py [--epochs 2] [--repeats 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import contextlib
from functools import partial
from unittest import mock

import torch
from common import interleaved, machine, markdown_table, median_spread, num_threads, paired_ratios

from sslfg.evaluation.linear import LinearHeads, train_heads


def batched_forward(self: LinearHeads, x: torch.Tensor) -> torch.Tensor:
    """The former forward: L thin products in one batched matmul."""
    w = torch.stack(list(self.weights))  # (L, D, C)
    b = torch.stack(list(self.biases)).unsqueeze(1)  # (L, 1, C)
    return torch.baddbmm(b, x.unsqueeze(0).expand(len(w), -1, -1), w)


def sweep(features: torch.Tensor, labels: torch.Tensor, epochs: int, batched: bool) -> None:
    with mock.patch.object(LinearHeads, "forward", batched_forward) if batched else contextlib.nullcontext():
        train_heads(features, labels, 10, [0.1] * 8, epochs, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per timed sweep")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    rows = []
    with num_threads(args.threads):
        print(machine(torch.device("cpu")))
        for dim in (128, 7056):
            x, y = torch.randn(9000, dim, generator=torch.Generator().manual_seed(0)), torch.arange(9000) % 10
            times = interleaved({"batched": partial(sweep, x, y, args.epochs, True),
                                 "joined": partial(sweep, x, y, args.epochs, False)}, args.repeats, 1,
                                torch.device("cpu"))
            per_epoch = {k: [t / args.epochs for t in v] for k, v in times.items()}
            rows.append([dim, median_spread(per_epoch["batched"]), median_spread(per_epoch["joined"]),
                         median_spread(paired_ratios(times, "batched", "joined"))])
    print(markdown_table(["D", "batched s/epoch", "joined s/epoch", "batched / joined"], rows))


if __name__ == "__main__":
    main()
