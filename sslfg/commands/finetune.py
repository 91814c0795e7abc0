"""Fine-tuning with the GLSim head (default) or the plain ViT head, and testing a checkpoint.

    accelerate launch -m eval.finetune --config configs/finetune/glsim_cub.yaml init=runs/lodisc_cub
    python -m eval.finetune --config configs/finetune/glsim_sample.yaml init=runs/sample_lodisc --check
    python -m eval.finetune --config configs/finetune/glsim_sample.yaml model.head=vit   # plain baseline
    python -m eval.finetune --config configs/finetune/glsim_cub.yaml --dataset configs/datasets/cars.yaml
    python -m eval.finetune --config runs/glsim_sample/config.yaml resume=auto
    python -m eval.finetune --config runs/glsim_sample/config.yaml eval_only=true   # test a checkpoint

--dataset PATH (a configs/datasets recipe) overrides the recipe's data keys; --check validates the
recipe and the data, builds the model, prints the start-up summary and exits.
The console command `sslfg-finetune` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from sslfg.cli import parse_run_cli, print_metrics, print_summary
from sslfg.config import load_config
from sslfg.finetune import finetune
from sslfg.schema import FinetuneConfig


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_run_cli(argv, __doc__, schema=FinetuneConfig)
    cfg = load_config(args.files, args.overrides, FinetuneConfig)
    run_dir = finetune(cfg, args.check, print_summary, print_metrics)
    if not args.check:
        print(f"run directory: {run_dir}")

