"""kNN classification and retrieval: `python -m eval.knn --help` (the code: sslfg/commands/knn.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.commands.knn import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
