"""The command layer: start-up summary and --check on every command, evaluation on a run's own data,
eval.finetune --dataset and its test table, per-command --help examples, sslfg.data.build.stats."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sslfg import entrypoints
from sslfg.cli import run_cli
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn, linear
from sslfg.commands import pretrain as train_ssl
from sslfg.config import ConfigError, load_config, save_config
from sslfg.data import shards
from sslfg.data.build import stats
from sslfg.entrypoints import RUNNABLE
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig
from sslfg.study import report
from sslfg.study import run as study_run
from tests.conftest import tiny_config

TINY_FT = ["model.name=vit_tiny_patch16_224", "model.patch_size=4", "model.top_k=3",
           "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "train.batch_size=8", "train.warmup_steps=2"]
KNN = ["knn.ks=[3, 5]", "knn.figures=false", "features.batch_size=5"]


def printed_summary(out: str) -> dict[str, str]:
    """The `key: value` lines under "start-up summary:" in a command's stdout."""
    lines = out.split("start-up summary:\n", 1)[1].splitlines()
    pairs = [line[2:].partition(": ") for line in lines if line.startswith("  ")]
    return {key: value for key, _, value in pairs}


def csv_facts(root: Path, split: str) -> tuple[int, int]:
    """(images, distinct class ids) of a csv split, read independently of sslfg."""
    with open(root / f"{split}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return len(rows), len({row["class_id"] for row in rows})


def dataset_yaml(root: Path, path: Path) -> Path:
    """A configs/datasets-style file for the tiny csv dataset."""
    path.write_text(yaml.safe_dump({"data": {"root": str(root), "train_split": "train", "image_size": 16,
                                             "num_workers": 0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrain(tiny_config(tiny_data, tmp_path_factory.mktemp("run") / "run", max_steps=2, figure_samples=0))


def test_train_ssl_check_prints_the_summary_and_writes_nothing(tiny_data: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", warmup_epochs=1.0, base_lr=0.01)
    cfg.data.mean = (0.5, 0.25, 0.125)
    recipe = tmp_path / "recipe.yaml"
    save_config(cfg, recipe)
    assert run_cli(train_ssl.main, ["--config", str(recipe), "--check", "data.std=[0.2, 0.2, 0.2]"]) == 0
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    summary = printed_summary(capsys.readouterr().out)
    images, classes = csv_facts(tiny_data, "train")
    per_epoch = math.ceil(images / cfg.train.batch_size)
    assert summary["data.root"] == str(tiny_data) and summary["data.format"] == "csv"
    assert (summary["data.train.images"], summary["data.train.classes"]) == (str(images), str(classes))
    assert summary["data.image_size"] == "16" and summary["data.skipped_images"] == "0"
    assert summary["data.mean"] == "[0.5, 0.25, 0.125]" and summary["data.mean.source"] == str(recipe)
    assert summary["data.std.source"] == "command line"
    assert summary["steps"] == str(cfg.train.epochs * per_epoch) and summary["warmup_steps"] == str(per_epoch)
    assert float(summary["lr"]) == pytest.approx(0.01 * cfg.train.batch_size / 256)
    assert summary["global_batch"] == "8" and summary["num_processes"] == "1" and summary["init"] == "scratch"


def test_pretraining_summary_json_holds_the_start_up_facts(tiny_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    save_config(tiny_config(tiny_data, tmp_path / "run", max_steps=1, figure_samples=0), recipe)
    assert run_cli(train_ssl.main, ["--config", str(recipe)]) == 0
    printed = printed_summary(capsys.readouterr().out)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key, value in printed.items():
        assert str(saved[key]) == value, key
    assert saved["data.mean.source"].endswith("(ImageNet)")  # the recipe holds ImageNet's values


def test_finetune_dataset_flag_check_and_test_table(tiny_data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = dataset_yaml(tiny_data, tmp_path / "tiny.yaml")
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'ft'}\ntrain: {{epochs: 1, checkpoint_every: 100}}\n")
    args = ["--config", str(recipe), "--dataset", str(data), *TINY_FT]
    assert run_cli(finetune_cli.main, [*args, "--check"]) == 0
    assert not (tmp_path / "ft").exists()
    summary = printed_summary(capsys.readouterr().out)
    assert summary["data.root"] == str(tiny_data) and summary["data.mean.source"] == str(data)
    assert summary["data.test.images"] == str(csv_facts(tiny_data, "test")[0])
    assert summary["steps"] == "3" and summary["warmup_steps"] == "2" and summary["lr"] == "0.01"

    assert run_cli(finetune_cli.main, args) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    for key in ("test.top1", "test.top5", "test.mean_per_class"):  # the evaluations' table format
        assert f"| {key} | {100 * metrics[key]:.2f} % |" in out
    assert f"metrics: {tmp_path / 'ft' / 'metrics.json'}" in out
    assert metrics["data.test.images"] == 8 and metrics["data.root"] == str(tiny_data)


def test_knn_defaults_to_the_runs_own_data(tiny_run: Path, tiny_data: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    own = knn.main(["--checkpoint", str(tiny_run), f"output_dir={tmp_path / 'own'}", *KNN])
    assert own["dataset"] == str(tiny_data) and own["data.train.images"] == 24
    assert str(tiny_run / "config.yaml") in own["data.settings"]
    assert str(tiny_run / "config.yaml") in printed_summary(capsys.readouterr().out)["data.settings"]
    explicit = knn.main(["--checkpoint", str(tiny_run), f"output_dir={tmp_path / 'explicit'}", *KNN,
                         f"data.root={tiny_data}", "data.image_size=16", "data.train_split=train",
                         "data.num_workers=0"])
    assert own["knn.k3.top1"] == explicit["knn.k3.top1"] and own["retrieval.mAP"] == explicit["retrieval.mAP"]
    # A --dataset names other data: the run's settings are not used.
    other = knn.main(["--checkpoint", str(tiny_run), "--dataset", str(dataset_yaml(tiny_data, tmp_path / "d.yaml")),
                      "--check"])
    assert other["data.mean"] == [0.5, 0.5, 0.5] and "run's own" not in other["data.settings"]


def test_data_root_on_the_command_line_keeps_the_runs_other_data_settings(tiny_run: Path, tiny_data: Path,
                                                                           tmp_path: Path) -> None:
    # the run's data at another folder: its image size (16, not the schema's 224), normalisation and splits stay
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = load_config(run / "config.yaml", [], PretrainConfig)
    cfg.data.mean, cfg.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    save_config(cfg, run / "config.yaml")
    other = shutil.copytree(tiny_data, tmp_path / "elsewhere")
    summary = knn.main(["--checkpoint", str(run), f"data.root={other}", "data.num_workers=0", "--check"])
    assert summary["data.root"] == str(other) and summary["data.image_size"] == 16
    assert summary["data.mean"] == [0.5, 0.5, 0.5] and summary["data.mean.source"] == str(run / "config.yaml")
    assert summary["data.train.images"] == 24  # data.train_split=train, the run's, not the schema's train_val
    settings = summary["data.settings"]
    assert settings.startswith("command line: data.root, data.num_workers; ")
    assert f"{run / 'config.yaml'}: data.format, data.images_dir, data.train_split" in settings
    assert "data.image_size, data.mean, data.std" in settings


def test_summaries_show_method_token_grid_boxes_and_probe_splits(tiny_data: Path, tiny_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "recipe.yaml"
    save_config(tiny_config(tiny_data, tmp_path / "run"), recipe)
    for weight, local in (("1", "on: weight 1, zero_fill view of 4 of 16 patches (keep_ratio 0.3, attention of every "
                                "block)"), ("0", "off (method.local.weight 0)")):
        assert run_cli(train_ssl.main, ["--config", str(recipe), "--check", f"method.local.weight={weight}"]) == 0
        summary = printed_summary(capsys.readouterr().out)
        assert summary["method"] == "mocov3" and summary["method.local"] == local
        assert summary["model.patch_size"] == "4" and summary["model.token_grid"] == "4x4 = 16 patches"
        assert summary["data.train.boxes"] == "False" and "train.loc_every" not in summary
    ft = [f"data.root={tiny_data}", "data.image_size=16", "data.train_split=train", "data.num_workers=0", *TINY_FT,
          f"output_dir={tmp_path / 'ft'}", "--check"]
    assert run_cli(finetune_cli.main, ft) == 0
    summary = printed_summary(capsys.readouterr().out)
    assert summary["model.top_k"] == "3" and summary["model.token_grid"] == "4x4 = 16 patches"

    summary = knn.main(["--checkpoint", str(tiny_run), "--check"])
    assert summary["model.token_grid"] == "4x4 = 16 patches" and summary["features.crop_ratio"] == 0.875
    assert summary["data.train.boxes"] is False and summary["data.test.boxes"] is False
    # no train + val pair: the lr is selected on round(0.1 · 8) = 1 image of each of the 3 classes held out of train
    summary = linear.main(["--checkpoint", str(tiny_run), "--check"])
    assert (summary["linear.fit_split"], summary["linear.fit_images"]) == ("train (the rest)", 21)
    assert (summary["linear.val_split"], summary["linear.val_images"]) == ("train (stratified 0.1 held out, seed 0)", 3)
    paired = shutil.copytree(tiny_data, tmp_path / "paired")
    shutil.copy(paired / "test.csv", paired / "val.csv")
    summary = linear.main(["--checkpoint", str(tiny_run), f"data.root={paired}", "--check"])
    assert (summary["linear.fit_split"], summary["linear.fit_images"], summary["linear.val_images"]) == ("train", 24, 8)
    summary = linear.main(["--checkpoint", str(tiny_run), "linear.mode=full", "linear.batch_size=8", "--check"])
    assert summary["linear.fit_images"] == 24 and summary["linear.val_split"].startswith("none")


def test_evaluations_check_builds_and_stops(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = linear.main(["--checkpoint", str(tiny_run), f"output_dir={tmp_path / 'lin'}", "--check",
                           "linear.batch_size=64", "linear.lrs=[0.1, 1.0]"])
    assert not (tmp_path / "lin").exists()
    assert summary["lr"] == pytest.approx([0.1 * 64 / 256, 1.0 * 64 / 256]) and summary["epochs"] == 100
    assert printed_summary(capsys.readouterr().out)["command"] == "linear"
    assert run_cli(knn.main, ["--checkpoint", str(tiny_run / "nosuch"), "--check"]) == 2  # still validated
    assert "nosuch" in capsys.readouterr().err


def test_a_console_command_runs_on_its_arguments_and_exits_with_the_status(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["sslfg-knn", "--checkpoint", str(tmp_path / "nosuch"), "--check"])
    with pytest.raises(SystemExit) as stop:
        entrypoints.knn()
    assert stop.value.code == 2 and "nosuch" in capsys.readouterr().err  # a user error: run_cli's status 2


def test_a_ctrl_c_while_a_command_imports_is_one_line(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C in the first seconds (torch, timm importing) printed Python's KeyboardInterrupt traceback."""
    def interrupted(_name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(entrypoints.importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as stop:
        entrypoints.pretrain()
    err = capsys.readouterr().err
    assert stop.value.code == 130 and err == f"error: {entrypoints.STARTING}\n"


@pytest.mark.parametrize("main", [train_ssl.main, knn.main, linear.main, finetune_cli.main, stats.main,
                                  study_run.main, report.main, shards.main])
def test_a_wrong_flag_is_one_line_naming_the_help(main, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse printed its usage block and `knn.py: error: ...` (the file's name, not the command's)."""
    with pytest.raises(SystemExit) as stop:
        main(["--chekpoint"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.fullmatch(r"error: (unrecognized arguments: --chekpoint|the following arguments are required: "
                        r"[^;]+); see `[^`]+ --help`\n", err), err


@pytest.mark.parametrize(("command", "name"), [(["train_ssl.py"], "python train_ssl.py"),
                                               (["-m", "eval.knn"], "python -m eval.knn"),
                                               (["-m", "sslfg.study"], "python -m sslfg.study")])
def test_a_command_is_named_as_it_was_typed(command: list[str], name: str) -> None:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, *command, "--bogus"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 2 and proc.stderr == f"error: unrecognized arguments: --bogus; see `{name} --help`\n"


def test_importing_sslfg_is_light() -> None:
    """What runs before a command's `launch` (`import sslfg`) imports neither torch nor numpy, so that a Ctrl-C can
    hardly come before it; the public functions still import from the package."""
    code = ("import sys, sslfg; print(sorted(m for m in ('torch', 'numpy', 'timm') if m in sys.modules)); "
            "from sslfg import load_backbone, evaluate_knn; print(callable(load_backbone), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0 and proc.stdout.split("\n")[:2] == ["[]", "True True"], proc


@pytest.mark.parametrize("main", [train_ssl.main, knn.main, linear.main, finetune_cli.main, stats.main])
def test_help_examples_are_the_commands_own(main, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    examples = [line.strip() for line in out.split("example", 1)[1].splitlines()[1:] if line.startswith("  ")]
    own = {train_ssl.main: "train_ssl.py", knn.main: "eval.knn", linear.main: "eval.linear",
           finetune_cli.main: "eval.finetune", stats.main: "sslfg.data.build.stats"}[main]
    assert examples and all(own in line.split("#")[0] for line in examples), examples
    assert "configs/pretrain/cub.yaml" not in out
    assert main is not finetune_cli.main or "keep_ratio" not in out  # a pretraining key


@pytest.mark.parametrize(("run", "command"), [
    (["-m", "sslfg.export"], "`sslfg-export` (from a checkout also `python -m eval.export`)"),
    (["-m", "sslfg.evaluation.knn"], "`sslfg-knn` (from a checkout also `python -m eval.knn`)"),
    (["-Bm", "sslfg.evaluation.localisation"], "`sslfg-localise`"),
    (["-m", "sslfg.commands.embed"], "`sslfg-embed` (from a checkout also `python -m eval.embed`)"),
    (["-m", "sslfg.study.run"], "`sslfg-study` (from a checkout also `python -m sslfg.study`)"),
    (["sslfg/pretrain.py"], "`sslfg-pretrain` (from a checkout also `python train_ssl.py`)"),
    (["-m", "sslfg.data.build"], "its programs are python -m sslfg.data.build.cluttered"),
    (["-m", "sslfg.summary"], "the commands are sslfg-pretrain, sslfg-knn"),
])
def test_a_library_module_run_as_a_command_names_the_command_and_fails(run: list[str], command: str,
                                                                       tmp_path: Path) -> None:
    """`python -m sslfg.export --checkpoint R --out O` exited 0 having done nothing; now one line and status 2."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, *run, "--checkpoint", "runs/x", "--out", str(tmp_path / "out")], cwd=root,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(root)})
    name = run[-1].removesuffix(".py").replace("/", ".")
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.startswith(f"error: {name} is a module of the sslfg library, not a command") and command in \
        proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_runnable_modules_are_those_with_a_main() -> None:
    """`sslfg.entrypoints` lets exactly the modules with a __main__ block run (tests/test_docs_commands.py checks
    its COMMANDS against pyproject.toml's console commands)."""
    package = Path(__file__).resolve().parents[1] / "sslfg"
    mains = {".".join(("sslfg", *p.relative_to(package).with_suffix("").parts)) for p in package.rglob("*.py")
             if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}
    assert RUNNABLE == mains | {"sslfg.study"}


def test_stats_match_numpy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(5)]
    (tmp_path / "images").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "train.csv").write_text("class_id,dir\n" + "".join(f"{i % 2},{i}.png\n" for i in range(5)))
    (tmp_path / "test.csv").write_text("class_id,dir\n0,0.png\n")  # never read: statistics are of the train split
    mean, std = stats.main([f"data.root={tmp_path}", "data.train_split=train", "data.image_size=12",
                            "data.num_workers=0"])
    pixels = np.stack(images).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-9)
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)["data"]
    np.testing.assert_allclose(printed["mean"], pixels.mean(0), atol=6e-5)  # 4 decimals, ready to paste
    np.testing.assert_allclose(printed["std"], pixels.std(0), atol=6e-5)


def test_a_recipe_given_as_the_dataset_is_named_so(tmp_path: Path) -> None:
    """A pretraining recipe given as --dataset was refused key by key: "unknown key 'method' ...; did you mean
    'linear.mode'?"."""
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=r"^--dataset: .*sample.yaml sets _?[a-z_, ]*method.*not a dataset recipe"):
        knn.main(["--random-init", "--model", "vit_tiny_patch16_224", "--dataset",
                  str(root / "configs/pretrain/sample.yaml"), "--check"])
    with pytest.raises(ConfigError, match=r"^--dataset: .*sets augment, method, model, output_dir, train,"):
        train_ssl.main(["--config", str(root / "configs/pretrain/sample.yaml"), "--dataset",
                        str(root / "configs/pretrain/sample.yaml"), "--check"])
