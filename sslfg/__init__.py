"""sslfg: self-supervised pretraining and transfer of Vision Transformers on fine-grained images."""

import importlib
import os

from sslfg.entrypoints import refuse_library_module

refuse_library_module()  # `python -m sslfg.export` and the like: say which command to run, never exit 0 silently

# Before torch loads OpenMP: its threads otherwise spin while waiting, which on a few cores shared
# with other processes is ruinous (2 cores, demo step beside another job: 7.6 s spinning, 1.5 s
# passive). On a quiet machine it neither helps nor costs much (bench/README.md, input_pipeline).
# A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The public functions, imported on first use (PEP 562): `import sslfg` stays light, so a command's heavy imports
# (torch, timm: seconds) happen where `sslfg.entrypoints.launch` can turn a Ctrl-C during them into one line.
_API = {"embed_images": "sslfg.api", "evaluate_knn": "sslfg.api", "evaluate_linear": "sslfg.api",
        "load_recipe": "sslfg.api", "load_transform": "sslfg.api", "run_pretraining": "sslfg.api",
        "load_backbone": "sslfg.weights"}
__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'sslfg' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
