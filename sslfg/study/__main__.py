"""`python -m sslfg.study`: the whole comparison (the code: sslfg/study/run.py)."""

import sys

from sslfg.cli import run_cli
from sslfg.study.run import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
