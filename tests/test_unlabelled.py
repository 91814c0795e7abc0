"""Unlabelled images as a pretraining dataset (issue 23 §1, issue 22 item 16): a flat folder, a csv without
class ids and a labelled layout read with data.labels=false pretrain every method; the online kNN and keep
precision run on the labelled `eval_data` or are off with one logged line, and --check says which; the
evaluations that need labels refuse unlabelled data with one error line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from sslfg.cli import run_cli
from sslfg.commands import knn, linear
from sslfg.commands import pretrain as train_ssl
from sslfg.config import ConfigError, load_config
from sslfg.data.datasets import build_dataset
from sslfg.data.images import DataError
from sslfg.methods import METHODS
from sslfg.pretrain import pretrain
from sslfg.schema import DataConfig, StudyConfig
from sslfg.study.run import Study
from tests.conftest import tiny_config, write_csv_dataset
from tests.reliability.procs import pretrain_args
from tests.test_study import write_recipes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny csv dataset with the object's box on every row, as the cluttered sample."""
    return write_csv_dataset(tmp_path_factory.mktemp("labelled"), boxes=True)


@pytest.fixture(scope="module")
def flat(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images in one flat folder: no class structure, no labels."""
    root = tmp_path_factory.mktemp("flat")
    for i, image in enumerate(sorted((labelled / "images").rglob("*.png"))):
        shutil.copy(image, root / f"{i:03d}.png")
    return root


def test_unlabelled_layouts_have_no_classes(labelled: Path, tmp_path: Path) -> None:
    """csv without class_id, csv and imagefolder with data.labels=false: every label -1, no classes."""
    (tmp_path / "images").symlink_to(labelled / "images")
    (tmp_path / "train.csv").write_text("dir\n" + "".join(f"train/{p.parent.name}/{p.name}\n" for p in sorted(
        (labelled / "images" / "train").rglob("*.png"))))
    no_column = build_dataset(DataConfig(root=str(tmp_path), labels=False), "train")
    withheld = build_dataset(DataConfig(root=str(labelled), labels=False, boxes=True), "train")
    folders = build_dataset(DataConfig(root=str(labelled / "images"), format="imagefolder", labels=False), "train")
    for dataset in (no_column, withheld, folders):
        assert len(dataset) == 24 and set(dataset.labels) == {-1}
        assert (dataset.num_classes, dataset.classes) == (0, [])
    assert withheld.boxes is not None and len(withheld.boxes) == 24  # boxes are kept without labels
    with pytest.raises(DataError, match="no column 'class_id'.*set data.labels=false"):
        build_dataset(DataConfig(root=str(tmp_path)), "train")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_pretrains_on_an_unlabelled_folder(name: str, flat: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Each method (with its local branch) trains 2 steps on a flat folder; the online kNN it asks for is off with
    one logged line, which the summary repeats."""
    cfg = tiny_config(flat, tmp_path / "run", max_steps=2, knn_every=1, figure_samples=0)
    cfg.data.format, cfg.method.name = "folder", name
    with caplog.at_level(logging.WARNING):
        run = pretrain(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["online_knn"].startswith(f"off: {flat} has no labels")
    assert [r.getMessage() for r in caplog.records if "online_knn" in r.getMessage() or "knn_every" in
            r.getMessage()] == [f"train.knn_every=1: {summary['online_knn']}"]
    assert (run / "backbone.safetensors").is_file()


def check(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """train_ssl.py --check through run_cli: its exit status 0 and the summary lines as a dict."""
    assert run_cli(train_ssl.main, [*args, "--check"]) == 0
    lines = [line.strip().partition(": ") for line in capsys.readouterr().out.splitlines()[1:]]
    return {key: value for key, _, value in lines}


def test_check_says_whether_the_online_evaluations_run(flat: Path, labelled: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = pretrain_args(flat, tmp_path / "run", **{"data.format": "folder", "train.knn_every": 1})
    off = check(base, capsys)
    assert off["online_knn"].startswith(f"off: {flat} has no labels (data.format=folder")
    assert "set eval_data.root to a labelled dataset" in off["online_knn"]
    on = check([*base, f"eval_data.root={labelled}", "eval_data.train_split=train", "train.loc_every=1",
                "eval_data.boxes=true"], capsys)
    assert on["online_knn"] == f"every 1 epochs on {labelled} (eval_data: bank train, queries test)"
    assert on["online_loc"] == f"every 1 epochs on {labelled} (eval_data: test)"
    assert "online_knn" not in check(pretrain_args(flat, tmp_path / "run", **{"data.format": "folder"}), capsys)
    assert not (tmp_path / "run").exists()  # --check writes nothing


def test_check_meets_what_the_first_evaluation_would_refuse(flat: Path, labelled: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A kNN bank below k 20 and a keep precision without boxes were errors only at step 0 of a run."""
    base = pretrain_args(flat, tmp_path / "run", **{"data.format": "folder", "eval_data.root": labelled,
                                                     "eval_data.train_split": "train"})
    for extra, culprit in ((["train.knn_every=1", "train.knn_samples=10"], "error: train.knn_samples"),
                           (["train.loc_every=1"], "error: train.loc_every")):
        assert run_cli(train_ssl.main, [*base, *extra, "--check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(culprit), err


@pytest.mark.parametrize("main", [knn.main, linear.main], ids=["knn", "linear"])
def test_evaluation_on_unlabelled_data_is_one_error_line(main, flat: Path, labelled: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Was `ValueError: query_labels holds a negative class id` after the extraction (issue 22 item 16)."""
    name = main.__module__.rpartition(".")[2]
    for data in ([f"data.root={flat}", "data.format=folder"], [f"data.root={labelled}", "data.labels=false"]):
        args = ["--random-init", "--model", "vit_tiny_patch16_224", "model_kwargs={embed_dim: 32, depth: 2, "
                "num_heads: 2, patch_size: 4}", "data.image_size=16", "data.num_workers=0", *data,
                f"output_dir={tmp_path}"]
        for check in ([], ["--check"]):  # --check meets it too
            assert run_cli(main, [*args, *check]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: eval.{name} needs labelled images"), err
            assert "sslfg-embed" in err[0]
    assert not list(tmp_path.glob("*.json"))


def test_pretrain_without_labels_then_evaluate_on_labelled_data(labelled: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The whole path on the cluttered recipe: its images with the labels withheld (data.labels=false), the online
    kNN and keep precision on the labelled set (eval_data), then eval.knn on the labelled set (data.root=)."""
    tiny = pretrain_args(labelled, tmp_path / "run", **{"data.labels": "false", "train.epochs": 1,
                                                         "train.knn_every": 1, "train.loc_every": 1,
                                                         "eval_data.root": labelled, "eval_data.train_split": "train",
                                                         "eval_data.boxes": "true", "train.warmup_epochs": 0})
    assert run_cli(train_ssl.main, ["--config", str(ROOT / "configs/pretrain/cluttered.yaml"), *tiny]) == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("online_knn.k20.top1" in m for m in logged) and any("online_loc.keep_precision" in m for m in logged)
    run = str(tmp_path / "run")
    assert run_cli(knn.main, ["--checkpoint", run]) == 2  # the run's own data has no labels
    assert "needs labelled images" in capsys.readouterr().err
    knn.main(["--checkpoint", run, f"data.root={labelled}", "data.train_split=train", "data.image_size=16",
              "data.num_workers=0", "knn.ks=[3]", "knn.figures=false", "features.batch_size=8"])
    result = json.loads((tmp_path / "run" / "eval" / "knn.json").read_text())
    assert result["protocol.bank_size"] == 24 and 0 <= result["knn.k3.top1"] <= 1


def test_a_study_evaluates_with_labels(labelled: Path, tmp_path: Path) -> None:
    """A pretraining arm may withhold the labels; the study's own dataset, which every evaluation reads, may not
    (its kNN would fail only after the first arm's training)."""
    config = write_recipes(labelled, tmp_path, seeds=[0], finetune_arms=False)
    study = Study(load_config(config, ["pretrain.arms={withheld: {data.labels: false}}"], StudyConfig))
    assert "withheld" in study.cfg.pretrain.arms  # its recipe checked with the labels withheld
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text(dataset.read_text().replace("data:\n", "data:\n  labels: false\n"))
    with pytest.raises(ConfigError, match=f"dataset: the study evaluates every arm with labels .* {dataset} has none"):
        Study(load_config(config, [], StudyConfig))
    assert not (tmp_path / "study").exists()
