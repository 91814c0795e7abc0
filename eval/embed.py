"""Embeddings of a dataset: `python -m eval.embed --help` (the code: sslfg/commands/embed.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.commands.embed import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
