"""Where a frozen backbone looks: `python -m eval.localise --help` (the code: sslfg/commands/localise.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.commands.localise import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
