"""Hugging Face-format (and ONNX) export of a run's backbone: `python -m eval.export --help` (the code:
sslfg/commands/export.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.commands.export")
