"""Any timm model for the global methods (issue 23 §5): MoCo v3, BYOL and DINO without the local branch pretrain
a CNN (its pooled feature), kNN, the linear probe and the plain fine-tuning head evaluate it, and what reads a
ViT's attention or tokens refuses it in one line at start-up and in --check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from sslfg import load_backbone
from sslfg.commands import export, finetune, knn, linear, localise
from sslfg.commands import pretrain as train_ssl
from sslfg.config import ConfigError
from tests.conftest import write_csv_dataset
from tests.reliability.procs import ENV, ROOT, finetune_args, pretrain_args

CNN = "resnet10t"  # timm's smallest ResNet
GLOBAL = {"model.name": CNN, "model.patch_size": 0, "model.kwargs": "{}", "method.local.weight": 0,
          "train.max_steps": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("cnn") / "data")


@pytest.fixture(scope="module")
def cnn_run(data: Path) -> Path:
    """A 2-step DINO run on the CNN (DINO: the method with the most of its own machinery, centre and schedule)."""
    run = data.parent / "dino"
    train_ssl.main(pretrain_args(data, run, **GLOBAL, **{"method.name": "dino"}))
    return run


@pytest.mark.parametrize("method", ["mocov3", "byol"])
def test_global_method_pretrains_a_cnn(method: str, data: Path) -> None:
    """Before, building the CNN failed: "unexpected keyword argument 'img_size'"."""
    run = data.parent / method
    train_ssl.main(pretrain_args(data, run, **GLOBAL, **{"method.name": method}))
    assert_finished(run)


def test_dino_pretrains_a_cnn_and_records_what_rebuilds_it(cnn_run: Path) -> None:
    assert_finished(cnn_run)
    meta = json.loads((cnn_run / "backbone.json").read_text())
    assert meta["kwargs"] == {}  # no img_size: a ResNet takes none, and timm.create_model(name, **kwargs) rebuilds it
    assert meta["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert not (cnn_run / "figures").exists()  # no kept-patch figures: a CNN has no attention to keep patches by


def assert_finished(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2
    backbone = load_backbone(run)
    assert type(backbone).__name__ == "ResNet"
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, backbone.num_features)


def test_knn_linear_probe_and_plain_fine_tuning_of_a_cnn(cnn_run: Path, data: Path) -> None:
    """Before, the kNN's feature cache key failed on batch norm's 0-dim num_batches_tracked."""
    result = knn.main(["--checkpoint", str(cnn_run), "knn.figures=false"])
    assert result["backbone"] == CNN and 0 <= result["knn.k10.top1"] <= 1
    assert 0 <= linear.main(["--checkpoint", str(cnn_run)])["linear.top1"] <= 1
    ft = data.parent / "ft"
    finetune.main([*finetune_args(data, ft, **{"model.head": "vit", "init": cnn_run, "model.drop_path_rate": 0.1}),
                   "train.max_steps=2"])
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["backbone"] == CNN and metrics["backbone_kwargs"] == {} and 0 <= metrics["test.top1"] <= 1


def test_the_issues_command_refuses_the_local_branch_in_one_line(tmp_path: Path) -> None:
    """`model.name=resnet50 --check` with the recipe's local branch on: one line naming the fix, not a traceback."""
    args = pretrain_args(write_csv_dataset(tmp_path / "data"), tmp_path / "run",
                         **{"model.name": "resnet50", "model.patch_size": 0, "model.kwargs": "{}"})
    proc = subprocess.run([sys.executable, "train_ssl.py", *args, "--check"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: model.name: LoDisc's local branch (method.local.weight > 0) needs a ViT's attention and patch "
        "tokens, but the backbone 'resnet50' is a ResNet, which gives only a pooled feature; set "
        "method.local.weight=0 for the global method alone, or use a ViT"]


def test_what_needs_a_vit_refuses_a_cnn_in_check(cnn_run: Path, data: Path) -> None:
    refusals = [
        (lambda: train_ssl.main([*pretrain_args(data, data.parent / "x", **GLOBAL), "train.loc_every=1", "--check"]),
         r"train\.loc_every: LoDisc keep precision logging needs a ViT's .* set train\.loc_every=0"),
        (lambda: finetune.main([*finetune_args(data, data.parent / "y", init=cnn_run), "--check"]),
         r"model\.head: GLSim \(model\.head=glsim\) needs .*'resnet10t' is a ResNet.*use model\.head=vit"),
        (lambda: finetune.main([*finetune_args(data, data.parent / "y", init=cnn_run, **{"model.head": "vit"}),
                                "model.adapter=ila", "--check"]),
         r"model\.adapter: ILA \(ila adapters\) needs .* set model\.adapter=none"),
        (lambda: localise.main(["--checkpoint", str(cnn_run), "--check"]),
         r"checkpoint: eval\.localise \(kept patches and GLS boxes\) needs .* evaluate a ViT backbone"),
        (lambda: knn.main(["--checkpoint", str(cnn_run), "features.kind=mean", "--check"]),
         r"features\.kind: the 'mean' feature needs .* use features\.kind=cls"),
    ]
    for command, message in refusals:
        with pytest.raises(ConfigError, match=message):
            command()
    assert not (data.parent / "x").exists() and not (data.parent / "y").exists()


def test_a_cnn_run_exports_a_folder_timm_loads(cnn_run: Path, data: Path) -> None:
    out = data.parent / "hf"
    export.main(["--checkpoint", str(cnn_run), "--out", str(out)])
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), load_backbone(cnn_run)(x), rtol=0, atol=0)
