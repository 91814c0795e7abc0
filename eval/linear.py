"""Linear probe on frozen features: `python -m eval.linear --help` (the code: sslfg/commands/linear.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.commands.linear")
