"""Case 6: two gloo processes give what one process gives. Pretraining with batch B on each equals one
process with batch 2B; kNN and fine-tune test accuracy are identical to one process, on 11 test
images (and a 25-image bank) that no eval batch x world size divides, each image counted once.

The one-process side runs in this process while the two gloo processes run beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn
from sslfg.commands import pretrain as train_ssl
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.methods import METHODS
from tests.conftest import write_csv_dataset
from tests.reliability.outcomes import assert_same_training
from tests.reliability.procs import command, finetune_args, finish, pretrain_args, start

N_TRAIN, N_TEST = 25, 11  # 3 global batches of 8 an epoch (one image left out); test 11 = 8 + 3


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("uneven"), n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def pretrained(uneven_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same pretraining on one process (batch 8) and on two (batch 4 each)."""
    root = tmp_path_factory.mktemp("pretrain")
    fixed = {"method.mocov3.projector_dropout": 0.0, "method.mocov3.predictor_dropout": 0.0}  # per-process RNG
    two = start(command(["train_ssl.py", *pretrain_args(uneven_data, root / "two", 4, **fixed)], processes=2))
    train_ssl.main(pretrain_args(uneven_data, root / "one", 8, **fixed))
    finish(two)
    return root / "one", root / "two"


def test_two_processes_equal_one_process_with_double_batch(pretrained: tuple[Path, Path]) -> None:
    runs = list(pretrained)
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert [s["num_processes"] for s in summaries] == [1, 2]
    assert summaries[0]["global_batch"] == summaries[1]["global_batch"]
    assert_same_training(*runs, steps=[1, 2, 3, 4, 5, 6])


MULTI_CROP = {"augment.local_crops": 2, "augment.local_crop_size": 8,
              "model.kwargs": '{embed_dim: 32, depth: 2, num_heads: 2, dynamic_img_size: true}'}


# mocov3 (+ local): the test above; DINO also with multi-crop, and with batch norm in its head (its statistics over
# every view of every process)
@pytest.mark.parametrize("name, extra", [*((m, {}) for m in METHODS if m != "mocov3"), ("dino", MULTI_CROP),
                                         ("dino", {**MULTI_CROP, "method.dino.use_bn_in_head": "true"})])
def test_every_method_on_two_processes_equals_one_process_with_double_batch(name: str, extra: dict,
                                                                          uneven_data: Path, tmp_path: Path) -> None:
    """Each method with its local branch (SimCLR, Barlow Twins, VICReg: from the encoder's own attention): the same
    losses, weights and buffers (DINO's centre, from the all-process mean of the teacher outputs) with batch 4 on
    each of two processes as with 8 on one."""
    fixed = {"method.name": name, "train.epochs": 1, **extra}
    two = start(command(["train_ssl.py", *pretrain_args(uneven_data, tmp_path / "two", 4, **fixed)], processes=2))
    train_ssl.main(pretrain_args(uneven_data, tmp_path / "one", 8, **fixed))
    finish(two)
    weights = assert_same_training(tmp_path / "one", tmp_path / "two", steps=[1, 2, 3])  # DINO's centre included
    assert name != "dino" or weights["center"].abs().sum() > 0  # the centre moved


def test_knn_on_two_processes_is_identical(pretrained: tuple[Path, Path], uneven_data: Path, tmp_path: Path) -> None:
    args = [f"data.root={uneven_data}", "data.image_size=16", "data.num_workers=0", "data.train_split=train",
            "features.batch_size=4", "knn.ks=[3, 5]", "knn.figures=false", "--checkpoint", str(pretrained[0])]
    two = start(command(["-m", "eval.knn", *args, f"output_dir={tmp_path / '2'}"], processes=2))
    knn.main([*args, f"output_dir={tmp_path / '1'}"])
    finish(two)
    one, two = (json.loads((tmp_path / n / "knn.json").read_text()) for n in ("1", "2"))
    for result in (one, two):  # every image once: no padding sample of the last batch kept
        assert (result["protocol.bank_size"], result["protocol.queries"]) == (N_TRAIN, N_TEST), result
    metrics = [k for k in one if k.startswith(("knn.", "retrieval."))]
    assert len(metrics) >= 6 and {k: one[k] for k in metrics} == {k: two[k] for k in metrics}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        a, b = (load_file(str(next((tmp_path / r / "features").glob(f"{split}-*.safetensors")))) for r in "12")
        assert len(a["labels"]) == n and torch.equal(a["labels"], b["labels"])  # same images, same order
        torch.testing.assert_close(a["features"], b["features"], rtol=1e-5, atol=1e-5)


def test_finetune_on_two_processes_is_identical(uneven_data: Path, tmp_path: Path) -> None:
    """Batch 8 on one process, 4 on each of two: the same training, and the 11 test images go
    through eval batches of 8 (+3) and 2 x 4 (+ 2 x 2, padded by accelerate)."""
    fixed = {"model.drop_path_rate": 0.0, "augment.random_erasing": 0.0}  # per-process RNG would differ
    two = start(command(["-m", "eval.finetune", *finetune_args(uneven_data, tmp_path / "2", 4, **fixed)], processes=2))
    finetune_cli.main(finetune_args(uneven_data, tmp_path / "1", 8, **fixed))
    finish(two)
    one, two = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("1", "2"))
    assert one["test.samples"] == two["test.samples"] == N_TEST
    tests = [k for k in one if k.startswith("test.")]
    assert len(tests) == 5 and {k: one[k] for k in tests} == {k: two[k] for k in tests}
    a, b = (load_file(str(checkpoint_dirs(tmp_path / n)[-1] / "model.safetensors")) for n in ("1", "2"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
