"""Linear probe on frozen features: fast lr sweep on cached features, or the full LoDisc recipe (METHODS §4).

    python -m eval.linear --checkpoint runs/lodisc_cub   # on the run's own data (its config.yaml)
    python -m eval.linear --checkpoint runs/lodisc_cub --dataset configs/datasets/cub.yaml --check
    python -m eval.linear --checkpoint runs/lodisc_cub linear.mode=full
    python -m eval.linear --checkpoint runs/lodisc_cub linear.mode=full linear.resume=auto
    python -m eval.linear --random-init --checkpoint runs/lodisc_cub   # the floor
    python -m eval.linear --dataset configs/datasets/sample.yaml features.kind=pixels   # raw pixels
    accelerate launch --multi_gpu --num_processes 2 -m eval.linear --checkpoint runs/lodisc_cub linear.mode=full

fast (default): one head per lr in linear.lrs trained at once on cached features; the lr is chosen on
`train` + data.val_split when the dataset has both, else on linear.val_fraction held out of
data.train_split; while the chosen lr is an end of the lrs swept, up to linear.extend_grid more lrs past it
are swept on the same split; that lr is retrained on data.train_split and reported on data.test_split. A
chosen lr still at an end is warned about (log, and protocol.lr_warning in the json, which also lists
protocol.lrs_swept and protocol.val_top1). Which test images the probe got right goes to linear.correct.json.
full: augmented images through the frozen backbone at linear.lr, no sweep; checkpoints every epoch
in <output_dir>/linear_full. Unless --dataset or --config names the data, a run directory's own
data settings fill every data key the command line leaves unset (data.settings in the summary says
which key came from where). --check validates the recipe and the data, builds the backbone, prints
the start-up summary and exits.
The console command `sslfg-linear` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sslfg.evaluation.linear import check_probe, probe_splits, run_probe
from sslfg.evaluation.run import run_evaluation
from sslfg.schema import EvalConfig


def schedule(cfg: EvalConfig, vit, num_processes: int, datasets: dict[str, Any]) -> dict[str, Any]:
    """The probe's schedule for the start-up summary: learning rates after scaling by batch / 256, and the
    images it trains on and selects the lr on (`probe_splits`)."""
    lin = cfg.linear
    lrs = lin.lrs if lin.mode == "fast" else [lin.lr]
    extend = {"linear.extend_grid": lin.extend_grid} if lin.mode == "fast" else {}
    return {"linear.mode": lin.mode, "epochs": lin.epochs, "global_batch": lin.batch_size * num_processes,
            "lr": [lr * lin.batch_size / 256 for lr in lrs], **extend, **probe_splits(cfg, datasets)}


def main(argv: Sequence[str] | None = None) -> dict:
    return run_evaluation(argv, __doc__, "linear", run_probe, schedule, check_data=check_probe)

