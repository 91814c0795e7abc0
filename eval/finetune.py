"""Fine-tuning and testing a checkpoint: `python -m eval.finetune --help` (the code: sslfg/commands/finetune.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.commands.finetune import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
