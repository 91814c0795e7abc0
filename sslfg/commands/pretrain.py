"""Self-supervised pretraining: MoCo v3, BYOL or DINO (`method.name`), with or without LoDisc's local branch
(`method.local.weight`; 0 switches it off).

    accelerate launch train_ssl.py --config configs/pretrain/sample.yaml train.epochs=2
    python train_ssl.py --config configs/pretrain/lodisc_vit_s16_cub.yaml data.root=/data/CUB_200_2011 --check
    python train_ssl.py --config configs/pretrain/sample.yaml method.local.weight=0 output_dir=runs/mocov3
    python train_ssl.py --config configs/pretrain/dino_sample.yaml
    python train_ssl.py --config runs/sample_lodisc/config.yaml resume=auto

--check validates the recipe and the data, builds the model, prints the start-up summary and exits.
The console command `sslfg-pretrain` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from sslfg.cli import parse_run_cli, print_summary
from sslfg.config import load_config
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_run_cli(argv, __doc__, schema=PretrainConfig)
    run_dir = pretrain(load_config(args.files, args.overrides, PretrainConfig), args.check, print_summary)
    if not args.check:
        print(f"run directory: {run_dir}")

