"""Linear probe on frozen features: fast lr sweep on cached features, or the full LoDisc recipe (METHODS §4).

    python -m eval.linear --checkpoint runs/lodisc_cub --dataset configs/datasets/cub.yaml
    python -m eval.linear --checkpoint runs/lodisc_cub --dataset ... linear.mode=full
    python -m eval.linear --checkpoint runs/lodisc_cub --dataset ... linear.mode=full linear.resume=auto
    python -m eval.linear --random-init --checkpoint runs/lodisc_cub --dataset ...   # the floor
    accelerate launch --multi_gpu --num_processes 2 -m eval.linear --checkpoint ... linear.mode=full

fast (default): one head per lr in linear.lrs trained at once on cached features; the lr is chosen on
`train` + data.val_split when the dataset has both, else on linear.val_fraction held out of
data.train_split; that lr is retrained on data.train_split and reported on data.test_split.
full: augmented images through the frozen backbone at linear.lr, no sweep; checkpoints every epoch
in <output_dir>/linear_full.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sslfg.cli import run_cli, run_evaluation
from sslfg.linear import run_fast_probe, run_full_probe


def main(argv: Sequence[str] | None = None) -> dict:
    return run_evaluation(argv, __doc__, "linear", lambda cfg, vit, accelerator, out: (
        run_fast_probe if cfg.linear.mode == "fast" else run_full_probe)(cfg, vit, accelerator, out))


if __name__ == "__main__":
    sys.exit(run_cli(main))
