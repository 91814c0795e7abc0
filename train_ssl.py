"""Self-supervised pretraining: `python train_ssl.py --help` (the code: sslfg/commands/pretrain.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.commands.pretrain import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
