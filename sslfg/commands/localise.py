"""Where a frozen backbone looks, against the object boxes of the test split (sslfg.evaluation.localisation).

    python -m eval.localise --checkpoint runs/cluttered_lodisc   # on the run's own data (its config.yaml)
    python -m eval.localise --random-init --checkpoint runs/cluttered_lodisc   # the floor, same architecture

LoDisc keep precision: the fraction of the ⌊localise.keep_ratio·N⌋ patches with the highest location
score of the backbone's own CLS attention whose centre lies inside the object box, next to chance (the
fraction of all patches inside) and lift (their ratio); unless set, localise.keep_ratio is the ratio the
run trained with (its method.local.keep_ratio), and localise.keep_ratio.source says which. GLS box: IoU
with the object box and the fraction of the object inside it (localise.top_k patches most similar to
CLS). Images go through the evaluations' resize + centre crop (features.crop_ratio), and the boxes with
them. Writes <output_dir>/localise.json and figures/localise.png (localise.figure_samples test images).
The test split needs boxes (data.boxes); --dataset PATH evaluates on other data, e.g.
configs/datasets/cluttered.yaml.
The console command `sslfg-localise` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sslfg.evaluation.localisation import localise_backbone, needs_attention
from sslfg.evaluation.run import run_evaluation
from sslfg.schema import EvalConfig
from sslfg.summary import kept_patches

# a run is scored at the keep ratio it trained with unless localise.keep_ratio is set
RUN_KEYS = {"localise.keep_ratio": "method.local.keep_ratio"}


def settings(cfg: EvalConfig, vit, num_processes: int, datasets: dict[str, Any]) -> dict[str, Any]:
    """The localisation settings for the start-up summary (the crop ratio is every evaluation's)."""
    loc = cfg.localise
    return {"localise.keep_ratio": loc.keep_ratio, "localise.kept_patches": kept_patches(vit, loc.keep_ratio),
            "localise.attention_layers": loc.attention_layers or "every block", "localise.top_k": loc.top_k,
            "localise.figure_samples": loc.figure_samples}


def main(argv: Sequence[str] | None = None) -> dict:
    return run_evaluation(argv, __doc__, "localise", localise_backbone, settings, needs_labels=False,
                          check_data=needs_attention, needs_vit="eval.localise (kept patches and GLS boxes)",
                          run_keys=RUN_KEYS)

