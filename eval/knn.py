"""kNN classification and retrieval: `python -m eval.knn --help` (the code: sslfg/commands/knn.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.commands.knn")
