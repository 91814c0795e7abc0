"""Embeddings of a dataset: `python -m eval.embed --help` (the code: sslfg/commands/embed.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.commands.embed")
