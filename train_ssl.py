"""Self-supervised pretraining (LoDisc, or MoCo v3 with model.local_weight=0).

    accelerate launch train_ssl.py --config configs/pretrain/sample.yaml [key=value ...]
    python train_ssl.py --config runs/x/config.yaml resume=auto
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sslfg.cli import parse_cli, run_cli
from sslfg.config import load_config
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig


def main(argv: Sequence[str] | None = None) -> None:
    run_dir = pretrain(load_config(*parse_cli(argv, __doc__), PretrainConfig))
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
