"""sslfg: self-supervised pretraining and transfer of Vision Transformers on fine-grained images."""

import os

from sslfg.entrypoints import refuse_library_module

refuse_library_module()  # `python -m sslfg.export` and the like: say which command to run, never exit 0 silently

# Before torch loads OpenMP: its threads otherwise spin while waiting, which on a few cores shared
# with other processes is ruinous (2 cores, demo step beside another job: 7.6 s spinning, 1.5 s
# passive). On a quiet machine it neither helps nor costs much (bench/README.md, input_pipeline).
# A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sslfg.api import (  # noqa: E402
    embed_images,
    evaluate_knn,
    evaluate_linear,
    load_recipe,
    load_transform,
    run_pretraining,
)
from sslfg.weights import load_backbone  # noqa: E402

__all__ = ["embed_images", "evaluate_knn", "evaluate_linear", "load_backbone", "load_recipe", "load_transform",
           "run_pretraining"]
