"""Online kNN during pretraining: the DINO kNN of a bounded subset, and no effect on the training itself."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sslfg.evaluation.online
from sslfg.data.datasets import build_dataset
from sslfg.data.images import DataError
from sslfg.data.transforms import eval_transform
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.evaluation.knn import knn_evaluate
from sslfg.evaluation.online import OnlineKnn, OnlineLocalisation, evaluation_datasets
from sslfg.models.backbone import forward_tokens
from sslfg.pretrain import pretrain
from sslfg.schema import EvalDataConfig
from sslfg.weights import load_backbone
from tests.conftest import tiny_config, write_csv_dataset


def test_online_knn_is_the_knn_of_evenly_spaced_subsets(tiny_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", max_steps=2, figure_samples=0)
    cfg.train.knn_samples = 20  # the fewest a k-20 kNN takes
    vit = load_backbone(pretrain(cfg))
    got = OnlineKnn(cfg, make_accelerator())(vit)
    assert vit.training  # handed back in training mode

    # Reference: the CLS features of images floor(i·23/19), i < 20 (train) and all 8 test images.
    transform = eval_transform(16, cfg.data.mean, cfg.data.std)
    vit.eval()

    def embed(split: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ds = build_dataset(cfg.data, split, transform)
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in idx])
            return forward_tokens(vit, x)[:, 0], torch.tensor([ds.labels[i] for i in idx])

    bank, bank_labels = embed("train", [i * 23 // 19 for i in range(20)])
    queries, labels = embed("test", list(range(8)))
    expected = knn_evaluate(bank, bank_labels, queries, labels, ks=[20], backend="torch")["knn.k20.top1"]
    assert got == {"online_knn.k20.top1": expected}

    # The raw-pixel floor: the same kNN on the normalised images of the same subsets, flattened.
    def pixels(split: str, idx: list[int]) -> torch.Tensor:
        ds = build_dataset(cfg.data, split, transform)
        return torch.stack([ds[i][0].flatten() for i in idx])

    floor = knn_evaluate(pixels("train", [i * 23 // 19 for i in range(20)]), bank_labels,
                         pixels("test", list(range(8))), labels, ks=[20], backend="torch")["knn.k20.top1"]
    assert OnlineKnn(cfg, make_accelerator()).pixel_floor(vit) == {"online_knn.pixels.k20.top1": floor}
    assert floor != expected  # the reference tells them apart
    monkeypatch.setattr(sslfg.evaluation.online, "PIXEL_FLOOR_BYTES", 28 * 3 * 16 * 16 * 4 - 1)
    assert OnlineKnn(cfg, make_accelerator()).pixel_floor(vit) == {}  # too big to hold: left out


def test_online_knn_leaves_the_training_run_unchanged(tiny_data: Path, tmp_path: Path) -> None:
    runs = {}
    for every in (0, 1):
        cfg = tiny_config(tiny_data, tmp_path / f"knn{every}", figure_samples=0)  # 2 epochs of 3 steps
        cfg.train.knn_every, cfg.train.knn_samples = every, 20
        cfg.method.mocov3.predictor_dropout = 0.2  # a random op in every step: the evaluation must not shift its stream
        runs[every] = pretrain(cfg)
    weights = [load_file(str(checkpoint_dirs(r)[-1] / "model.safetensors")) for r in runs.values()]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    records = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "online_knn.k20.top1" in r] == [0, 3, 6]
    assert [r["step"] for r in records if "online_knn.pixels.k20.top1" in r] == [0]  # the floor, once
    plain = [r for r in records if "loss" in r]
    assert plain == [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]


def test_online_knn_reads_eval_data(tmp_path: Path, tiny_data: Path) -> None:
    """On unlabelled data it reads eval_data, at the run's image size and normalisation (was: an error at step 0;
    without eval_data it is now off: tests/test_unlabelled.py)."""
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.data.format, cfg.data.root, cfg.train.knn_every = "folder", str(tiny_data / "images"), 1
    cfg.eval_data.root, cfg.eval_data.train_split = str(tiny_data), "train"
    knn = OnlineKnn(cfg, make_accelerator())
    assert (len(knn.bank), len(knn.queries)) == (24, 8)
    assert knn.bank[0][0].shape == (3, 16, 16) and knn.bank[0][1] == 0


@pytest.mark.parametrize(("keys", "expected"), [
    ({"root": "{missing}"}, "eval_data.root does not exist or is not a folder: {missing} (resolved to {missing}). "
                            "Set eval_data.root to your dataset's folder"),
    ({"num_classes": 2}, "below num_classes = 2; fix the csv (or eval_data.num_classes)"),
    ({"boxes": True}, "(eval_data.boxes is true: add the box columns, or set eval_data.boxes=false)"),
    ({"test_split": "tset"}, "eval_data.test_split: 'tset' is not a split of {root} (no tset.csv there"),
    ({"root": "{unlabelled}"}, "{unlabelled}/train.csv has no column 'class_id'"),
])
def test_an_eval_data_error_names_the_eval_data_key(keys: dict, expected: str, tmp_path: Path,
                                                    tiny_data: Path) -> None:
    """An error about eval_data's dataset named the data.* key (`data.root does not exist: <eval_data.root>`),
    which the user had not set; now every key eval_data sets is named as eval_data's (the keys it takes from data,
    such as data.on_bad_image, keep their name)."""
    cfg = tiny_config(tiny_data, tmp_path / "run")
    cfg.train.knn_every, cfg.eval_data.root, cfg.eval_data.train_split = 1, str(tiny_data), "train"
    unlabelled = tmp_path / "unlabelled"  # the tiny data's csv files without their first column, class_id
    unlabelled.mkdir()
    (unlabelled / "images").symlink_to(tiny_data / "images")
    for split in ("train", "test"):
        rows = (tiny_data / f"{split}.csv").read_text().splitlines()
        (unlabelled / f"{split}.csv").write_text("".join(row.split(",", 1)[1] + "\n" for row in rows))
    fill = {"missing": str(tmp_path / "missing"), "root": str(tiny_data), "unlabelled": str(unlabelled)}
    for key, value in keys.items():
        setattr(cfg.eval_data, key, value.format(**fill) if isinstance(value, str) else value)
    with pytest.raises(DataError) as error:
        OnlineKnn(cfg, make_accelerator())
    assert expected.format(**fill) in str(error.value)
    # the online kNN cannot do without labels: the hint to read the images without them says so
    assert "no column" not in str(error.value) or "(evaluations need labels)" in str(error.value)
    own = [f"data.{f.name}" for f in dataclasses.fields(EvalDataConfig)]
    assert not [key for key in own if key in str(error.value).replace("eval_data.", "")]


@pytest.mark.parametrize("val", ["val", "test"])
def test_online_evaluations_read_the_validation_pair(val: str, tmp_path: Path) -> None:
    """Data with a validation split (train, val, train_val, test): the online kNN's bank is `train` and its
    queries and the keep precision's images are data.val_split, never the test split, so that a recipe chosen
    by its learning curves is not chosen on test; the start-up summary says so. A val_split that is the test split
    (or data without `train` + val) reads data.train_split and data.test_split as before."""
    root = write_csv_dataset(tmp_path / "data", n_test=6, boxes=True)
    shutil.copy(root / "test.csv", root / "val.csv")
    lines = (root / "test.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join(lines[:4]) + "\n")  # 3 test images: another split than val's 6
    cfg = tiny_config(root, tmp_path / "run", max_steps=1, figure_samples=0)
    cfg.data.boxes, cfg.data.val_split, cfg.train.knn_samples = True, val, 20
    knn, loc = OnlineKnn(cfg, make_accelerator()), OnlineLocalisation(cfg)
    queries = 6 if val == "val" else 3
    assert (len(knn.bank), len(knn.queries), len(loc.images)) == (20, queries, queries)
    data = evaluation_datasets(cfg).data
    assert (data.train_split, data.test_split) == (("train", "val") if val == "val" else ("train", "test"))
    run = pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, knn_every=1, loc_every=1)))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["online_knn"] == f"every 1 epochs on {root} (data: bank train, queries {data.test_split})"
    assert summary["online_loc"] == f"every 1 epochs on {root} (data: {data.test_split})"
