"""Case 11: two "machines" on one box, as a multi-node job starts them: one `accelerate launch --num_machines 2
--machine_rank 0|1 --main_process_ip 127.0.0.1 --main_process_port P` each, one gloo process per machine. They
give what one process with the global batch gives: pretraining loss and weights, and a kNN evaluation.

The one-process side runs in this process while the two machines run beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sslfg.commands import knn
from sslfg.commands import pretrain as train_ssl
from tests.conftest import write_csv_dataset
from tests.reliability.outcomes import assert_same_training
from tests.reliability.procs import finish, free_port, pretrain_args, start

N_TRAIN, N_TEST = 25, 11  # one global batch of 8 leaves an image out each epoch; 11 test images: uneven shards
# per-process dropout RNG would differ
FIXED = {"method.mocov3.projector_dropout": 0.0, "method.mocov3.predictor_dropout": 0.0}


def machines(entry: list[str]) -> list[subprocess.Popen]:
    """`entry` started as two one-process machines of one job, rank 0 (the main process) first."""
    port = str(free_port())
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [start([*launch, "--machine_rank", str(rank), *entry]) for rank in (0, 1)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("multinode"), n_train=N_TRAIN, n_test=N_TEST)


@pytest.fixture(scope="module")
def pretrained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same pretraining on one process (batch 8) and on two machines (batch 4 each), one shared run directory."""
    root = tmp_path_factory.mktemp("pretrain")
    nodes = machines(["train_ssl.py", *pretrain_args(data, root / "two", 4, **FIXED)])
    train_ssl.main(pretrain_args(data, root / "one", 8, **FIXED))
    for node in nodes:
        finish(node)
    return root / "one", root / "two"


def test_two_machines_pretrain_as_one_process_with_the_global_batch(pretrained: tuple[Path, Path]) -> None:
    runs = list(pretrained)
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert [s["num_processes"] for s in summaries] == [1, 2]
    assert summaries[0]["global_batch"] == summaries[1]["global_batch"] == 8
    assert_same_training(*runs, steps=[1, 2, 3, 4, 5, 6])


def test_two_machines_knn_as_one_process(pretrained: tuple[Path, Path], data: Path, tmp_path: Path) -> None:
    args = [f"data.root={data}", "data.image_size=16", "data.num_workers=0", "data.train_split=train",
            "features.batch_size=4", "knn.ks=[3, 5]", "knn.figures=false", "--checkpoint", str(pretrained[0])]
    nodes = machines(["-m", "eval.knn", *args, f"output_dir={tmp_path / '2'}"])
    knn.main([*args, f"output_dir={tmp_path / '1'}"])
    for node in nodes:
        finish(node)
    one, two = (json.loads((tmp_path / n / "knn.json").read_text()) for n in ("1", "2"))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for result in (one, two):  # every image once
        assert (result["protocol.bank_size"], result["protocol.queries"]) == (N_TRAIN, N_TEST), result
    metrics = [k for k in one if k.startswith(("knn.", "retrieval."))]
    assert len(metrics) >= 6 and {k: one[k] for k in metrics} == {k: two[k] for k in metrics}
