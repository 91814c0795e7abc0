"""Hugging Face-format (and ONNX) export of a run's backbone: `python -m eval.export --help` (the code:
sslfg/commands/export.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.commands.export import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
