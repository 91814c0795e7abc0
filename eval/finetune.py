"""Fine-tuning with the GLSim head (default) or the plain ViT head, and testing a checkpoint.

    accelerate launch -m eval.finetune --config configs/finetune/glsim_cub.yaml init=runs/lodisc_cub
    python -m eval.finetune --config configs/finetune/glsim_sample.yaml init=weights/vit_b16_in21k.safetensors
    python -m eval.finetune --config configs/finetune/glsim_sample.yaml model.head=vit   # plain baseline
    python -m eval.finetune --config runs/ft_x/config.yaml resume=auto
    python -m eval.finetune --config runs/ft_x/config.yaml eval_only=true               # test a checkpoint
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sslfg.cli import parse_cli, run_cli
from sslfg.config import load_config
from sslfg.finetune import finetune
from sslfg.schema import FinetuneConfig


def main(argv: Sequence[str] | None = None) -> None:
    run_dir = finetune(load_config(*parse_cli(argv, __doc__), FinetuneConfig))
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
