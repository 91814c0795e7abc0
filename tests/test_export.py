"""Weights out (issue 23 §3): backbone.json's pretrained_cfg gives timm the run's preprocessing, `eval.export`
writes a Hugging Face-format folder that timm loads offline, and its --onnx graph matches the torch backbone."""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from sslfg import load_backbone
from sslfg.commands import export, knn
from sslfg.config import ConfigError
from sslfg.export import ONNX_FILE
from sslfg.pretrain import pretrain
from sslfg.weights import BACKBONE_META, BACKBONE_WEIGHTS
from tests.conftest import tiny_config, write_csv_dataset
from tests.reliability.outcomes import user_error
from tests.reliability.procs import ENV, ROOT

MEAN, STD = (0.1, 0.2, 0.3), (0.3, 0.25, 0.2)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step MoCo v3 run with its own mean and std, and a kNN evaluation of it in <run>/eval/knn.json."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(write_csv_dataset(tmp / "data"), tmp / "run", max_steps=2, figure_samples=0)
    cfg.data.mean, cfg.data.std, cfg.method.local.weight = MEAN, STD, 0.0
    run_dir = pretrain(cfg)
    knn.main(["--checkpoint", str(run_dir), "knn.figures=false"])
    return run_dir


def test_backbone_json_gives_timm_the_runs_preprocessing(run: Path) -> None:
    """Before, resolve_data_config on the exported weights gave timm's mean/std 0.5 and 224 px."""
    meta = json.loads((run / BACKBONE_META).read_text())
    overlay = {**meta["pretrained_cfg"], "file": str(run / BACKBONE_WEIGHTS)}
    model = timm.create_model(meta["name"], pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
                              **meta["kwargs"]).eval()
    config = timm.data.resolve_data_config({}, model=model)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    assert config == {"input_size": (3, 16, 16), "mean": MEAN, "std": STD, "crop_pct": 0.875, "crop_mode": "center",
                      "interpolation": "bilinear"}
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), load_backbone(run)(x), rtol=0, atol=0)


def test_hf_folder_loads_offline_with_equal_outputs(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export.main(["--checkpoint", str(run), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", "sslfg_config.yaml"}
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(x), load_backbone(run)(x), rtol=0, atol=0)
    config = timm.data.resolve_data_config({}, model=model)
    assert [tuple(config[k]) for k in ("input_size", "mean", "std")] == [(3, 16, 16), MEAN, STD]
    card = (out / "README.md").read_text()
    knn_top1 = json.loads((run / "eval" / "knn.json").read_text())["knn.k10.top1"]
    for fact in ("method: mocov3", "2 of 6 optimizer steps", f"knn.k10.top1 {100 * knn_top1:.2f} %",
                 'timm.create_model("local-dir:hf", pretrained=True)', "upload_folder(", "mean [0.1, 0.2, 0.3]"):
        assert fact in card, fact
    assert ONNX_FILE not in card


def test_onnx_graph_matches_the_torch_backbone(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime

    out = tmp_path / "onnx"
    report = export.main(["--checkpoint", str(run), "--out", str(out), "--onnx"])
    assert report["onnx.max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16)  # another batch size than the export's: the batch axis is dynamic
    with torch.no_grad():
        expected = load_backbone(run)(x).numpy()
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]),
                               torch.from_numpy(expected), rtol=0, atol=1e-4)


def test_missing_onnx_package_names_the_extra(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxruntime"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ConfigError, match=r"--onnx needs the packages onnx and onnxruntime .*sslfg\[onnx\]"):
        export.main(["--checkpoint", str(run), "--out", str(tmp_path / "x"), "--onnx", "--check"])
    assert not (tmp_path / "x").exists()


def test_check_writes_nothing_and_an_empty_folder_is_used(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    export.main(["--checkpoint", str(run), "--out", str(out), "--check"])
    assert not out.exists()
    out.mkdir()
    export.main(["--checkpoint", str(run), "--out", str(out)])
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".empty-*"))


def test_a_folder_with_files_is_refused_in_one_line(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    proc = subprocess.run([sys.executable, "-m", "eval.export", "--checkpoint", str(run), "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --out: '{out}' exists and is not an empty folder; give a "
                                                "new folder (the export never writes into one it did not create)"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_run_exported_before_the_preprocessing_was_recorded_says_how_to_redo_it(run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old_run"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints", "eval", "tensorboard"))
    meta = json.loads((old / BACKBONE_META).read_text())
    del meta["pretrained_cfg"]
    (old / BACKBONE_META).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"before sslfg recorded the run's preprocessing; .*resume=auto"):
        export.main(["--checkpoint", str(old), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


DAMAGE = {  # file of the run -> (new content, what the error says is wrong)
    "config.yaml": (lambda text: text[:len(text) // 2] + "\n  : [", "cannot be read ("),
    "backbone.json": (lambda text: text[:len(text) // 2], "cannot be read (Unterminated string"),
    "backbone.json:empty": (lambda text: "{}", "cannot be read (no 'name', 'kwargs')"),
    "summary.json": (lambda text: text[:10], "cannot be read ("),
    "eval/knn.json": (lambda text: "[1, 2]", "cannot be read (it holds list, not a mapping)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_file_of_the_run_is_one_error_naming_it(damage: str, run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A run's config.yaml or backbone.json cut short (or an eval json, a summary.json edited) was a YAML or JSON
    parser's traceback, or KeyError: 'name', in eval.knn, eval.export and load_backbone."""
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    name = damage.split(":")[0]
    edit, problem = DAMAGE[damage]
    (damaged / name).write_text(edit((damaged / name).read_text()))
    commands = [(export.main, ["--checkpoint", str(damaged), "--out", str(tmp_path / "out")])]
    if name in ("config.yaml", "backbone.json"):  # what an evaluation reads of the run
        commands.append((knn.main, ["--checkpoint", str(damaged), "--check"]))
    for main, argv in commands:
        message = user_error(main, argv, capsys)
        assert message.startswith(f"{damaged / name}: this file of an sslfg run cannot be read") and problem in message
    assert not (tmp_path / "out").exists()


def test_exporting_a_fine_tuning_run_names_what_to_export(run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """eval.export --check passed on a fine-tuning run and the export itself was KeyError: 'method' (its config has
    `init` and no method)."""
    tuned = tmp_path / "tuned"
    shutil.copytree(run, tuned, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "eval"))
    cfg = yaml.safe_load((tuned / "config.yaml").read_text())
    del cfg["method"]
    (tuned / "config.yaml").write_text(yaml.safe_dump({**cfg, "init": str(run)}))
    for check in (["--check"], []):
        message = user_error(export.main, ["--checkpoint", str(tuned), "--out", str(tmp_path / "out"), *check], capsys)
        assert message.startswith(f"--checkpoint: '{tuned}' is a fine-tuning run"), message
        assert "give the pretraining run" in message
    assert not (tmp_path / "out").exists()
