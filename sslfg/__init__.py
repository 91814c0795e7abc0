"""sslfg: self-supervised pretraining and transfer of Vision Transformers on fine-grained images."""

from sslfg.models.backbone import load_backbone

__all__ = ["load_backbone"]
