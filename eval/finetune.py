"""Fine-tuning and testing a checkpoint: `python -m eval.finetune --help` (the code: sslfg/commands/finetune.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.commands.finetune")
