"""kNN classification (DINO protocol) and leave-one-out retrieval (LoDisc protocol) on frozen features.

    python -m eval.knn --checkpoint runs/lodisc_cub   # on the run's own data (its config.yaml)
    python -m eval.knn --checkpoint runs/lodisc_cub --dataset configs/datasets/cub.yaml --check
    python -m eval.knn --checkpoint vit_s.safetensors --model vit_small_patch16_224 --dataset configs/datasets/cub.yaml
    python -m eval.knn --random-init --checkpoint runs/lodisc_cub   # the floor, same architecture
    python -m eval.knn --dataset configs/datasets/sample.yaml features.kind=pixels   # raw pixels, no network
    accelerate launch --multi_gpu --num_processes 2 -m eval.knn --checkpoint runs/lodisc_cub   # same numbers

Bank = data.train_split, queries = data.test_split; retrieval runs over the test split (its mAP is left
out, with a warning and protocol.retrieval_mAP saying why, when every class has one test image). knn.val=true
also reports val.knn.* (bank: train, queries: data.val_split, or a part of data.train_split held out
by seed when the dataset has no such pair): the number a choice, e.g. the study's fine-tuning init,
is made on. Which test images each k got right goes to knn.correct.json. Unless
--dataset or --config names the data, a run directory's own data settings fill every data key the
command line leaves unset (so data.root=PATH evaluates the run's kind of data in another folder);
the summary's data.settings says which key came from where. --check validates the recipe and the
data, builds the backbone, prints the start-up summary and exits.
The console command `sslfg-knn` takes the same arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from sslfg.evaluation.knn_transfer import check_test_split, knn_transfer
from sslfg.evaluation.run import run_evaluation


def main(argv: Sequence[str] | None = None) -> dict:
    return run_evaluation(argv, __doc__, "knn", knn_transfer, check_data=check_test_split)

