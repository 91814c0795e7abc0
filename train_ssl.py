"""Self-supervised pretraining: `python train_ssl.py --help` (the code: sslfg/commands/pretrain.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.commands.pretrain")
