"""Where a frozen backbone looks: `python -m eval.localise --help` (the code: sslfg/commands/localise.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.commands.localise")
