"""Linear probe on frozen features: `python -m eval.linear --help` (the code: sslfg/commands/linear.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.commands.linear import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
