"""eval.knn end to end: metrics file, figures, floor, distributed equality, user errors."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sslfg.cli import run_cli
from sslfg.commands import knn, linear, localise
from sslfg.data import datasets as datasets_module
from sslfg.pretrain import pretrain
from sslfg.verdicts import correct_path, read_correct
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}"]


def data_args(root: Path) -> list[str]:
    return [f"data.root={root}", "data.image_size=16", "data.num_workers=0", "data.train_split=train",
            "features.batch_size=5", "knn.ks=[3, 5]"]


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain(tiny_config(tiny_data, tmp_path_factory.mktemp("run") / "run", max_steps=2, figure_samples=0))


def test_knn_on_a_run_directory(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy.json"
    assert run_cli(knn.main, ["--checkpoint", str(tiny_run), "--output", str(out), *data_args(tiny_data)]) == 0
    result = json.loads((tiny_run / "eval" / "knn.json").read_text())
    assert result == json.loads(out.read_text())
    for key in ("knn.k3.top1", "knn.k5.top5", "knn.k1.top1", "retrieval.top1", "retrieval.top5", "retrieval.mAP"):
        assert 0 <= result[key] <= 1, key
    assert result["protocol.temperature"] == 0.07 and result["protocol.bank_split"] == "train"
    assert result["backbone"] == "vit_tiny_patch16_224" and result["init"].endswith("backbone.safetensors")
    assert (tiny_run / "eval" / "figures" / "knn_neighbours.png").is_file()
    assert (tiny_run / "eval" / "figures" / "tsne_test.png").is_file()


def test_random_init_floor_and_weights_file(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    args = [*data_args(tiny_data), "knn.figures=false", "knn.retrieval=false"]
    floor = knn.main(["--checkpoint", str(tiny_run), "--random-init", *args])
    assert floor["init"] == "random" and (tiny_run / "eval-random" / "knn.json").is_file()
    weights = knn.main(["--checkpoint", str(tiny_run / "backbone.safetensors"), "--model", "vit_tiny_patch16_224",
                        f"output_dir={tmp_path / 'file'}", *TINY, *args])
    trained = knn.main(["--checkpoint", str(tiny_run), f"output_dir={tmp_path / 'run'}", *args])
    # The same backbone through its run directory or its weights file gives the same numbers.
    assert weights["knn.k3.top1"] == trained["knn.k3.top1"] and weights["knn.k5.top5"] == trained["knn.k5.top5"]


def test_user_errors_are_one_line(tiny_data: Path, tiny_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(knn.main, ["--checkpoint", str(tiny_run), *data_args(tiny_data), "data.test_split=nosuch"]) == 2
    assert "nosuch.csv" in capsys.readouterr().err
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "test.csv").write_text("class_id,dir\n")
    (empty / "images").mkdir()
    args = ["--checkpoint", str(tiny_run), f"output_dir={tmp_path / 'out'}", *data_args(empty), "data.train_split=test"]
    assert run_cli(knn.main, args) == 2
    assert "test.csv" in capsys.readouterr().err
    wrong = tmp_path / "wide.safetensors"  # a backbone of another width
    state = {k: torch.zeros(*v.shape[:-1], v.shape[-1] * 2) if v.ndim else v
             for k, v in load_file(str(tiny_run / "backbone.safetensors")).items()}
    save_file(state, str(wrong))
    assert run_cli(knn.main, ["--checkpoint", str(wrong), "--model", "vit_tiny_patch16_224", *TINY,
                              f"output_dir={tmp_path / 'out'}", *data_args(tiny_data)]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert run_cli(knn.main, [*data_args(tiny_data)]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_raw_pixels_need_no_network_and_say_so(tiny_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """features.kind=pixels without --checkpoint: the floor as its own command; its summary and json say
    features: pixels and no init: random (the old floor went through --random-init)."""
    result = knn.main([*data_args(tiny_data), "features.kind=pixels", "knn.figures=false", f"output_dir={tmp_path}"])
    assert result["features"] == "pixels" and result["feature"] == "pixels" and result["init"] == "none (raw pixels)"
    out = capsys.readouterr().out
    assert "  features: pixels" in out and "init: random" not in out
    hits = read_correct(correct_path(tmp_path, "knn"), "knn.k3.top1")
    assert len(hits) == 8 and hits.mean() == pytest.approx(result["knn.k3.top1"])  # one record per test image
    assert run_cli(localise.main, [*data_args(tiny_data), "features.kind=pixels", f"output_dir={tmp_path}"]) == 2
    assert "features.kind: pixels has no attention" in capsys.readouterr().err


def test_knn_on_validation_never_reads_the_test_split(tiny_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """knn.val=true: bank = train less a held-out tenth per class, queries = that tenth (no val split here);
    test labels that change every answer leave val.knn.* as it was."""
    args = ["--checkpoint", str(tiny_run), *data_args(tiny_data), "knn.val=true", "knn.figures=false"]
    result = knn.main([*args, f"output_dir={tmp_path / 'a'}"])
    assert result["protocol.val_query_split"].startswith("train (stratified 0.1 held out, seed 0)")
    assert result["protocol.val_bank_split"] == "train (the rest)"
    shuffled = tmp_path / "shuffled"
    shutil.copytree(tiny_data, shuffled, symlinks=True)
    header, *rows = (tiny_data / "test.csv").read_text().splitlines()
    (shuffled / "test.csv").write_text("\n".join([header, *(f"{(int(r[0]) + 1) % 3}{r[1:]}" for r in rows)]) + "\n")
    other = knn.main([*args, f"data.root={shuffled}", f"output_dir={tmp_path / 'b'}"])
    assert other["val.knn.k3.top1"] == result["val.knn.k3.top1"] and other["knn.k3.top1"] != result["knn.k3.top1"]


@pytest.mark.parametrize("command", [knn, linear], ids=["knn", "linear"])
def test_an_evaluation_reads_each_split_once(command, tiny_run: Path, tiny_data: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Each split is built once per command: with data.on_bad_image=skip every image is decoded twice, once when
    its split is read and once for its features (three times when the command built its splits twice), and a
    test split that the training split lists is warned about once."""
    decoded: Counter[str] = Counter()

    def counting(path: str, *args: object) -> object:
        decoded[path] += 1
        return load_image(path, *args)

    load_image = datasets_module.load_image
    monkeypatch.setattr(datasets_module, "load_image", counting)
    args = ["--checkpoint", str(tiny_run), *data_args(tiny_data), "data.on_bad_image=skip", "features.cache=false",
            "knn.figures=false", "linear.epochs=1"]
    command.main([*args, f"output_dir={tmp_path / 'test'}"])
    assert len(decoded) == 32 and set(decoded.values()) == {2}
    with caplog.at_level(logging.WARNING, logger="sslfg.data.datasets"):
        command.main([*args, "data.test_split=train_val", f"output_dir={tmp_path / 'overlap'}"])
    assert sum("also lists" in r.getMessage() for r in caplog.records) == 1
