"""The study end to end on tiny data: every arm, the report's tables and figures, continuing a killed study."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sslfg.cli import run_cli
from sslfg.config import ConfigError, load_config
from sslfg.data import shards
from sslfg.files import write_json
from sslfg.schema import DataConfig, StudyConfig
from sslfg.study import run as study_module
from sslfg.study.layout import best_pretrain_arm, done_path, read_metrics_log
from sslfg.study.report import Report, build_report
from sslfg.study.report import main as report_main
from sslfg.study.run import Study
from sslfg.verdicts import correct_path, write_correct
from tests.conftest import TINY_METHOD, TINY_MODEL
from tests.reliability.procs import command, finish, start
from tests.test_localisation import write_boxed_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = {"image_size": 16, "num_workers": 0, "train_split": "train", "test_split": "test"}
VIT = {"name": TINY_MODEL["name"], "patch_size": 4, "kwargs": TINY_MODEL["kwargs"]}


def write_recipes(data: Path, folder: Path, seeds: list[int], finetune_arms: bool = True) -> Path:
    """Dataset, pretraining, fine-tuning and study recipes for the tiny data; returns the study's."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = {"data": {"root": str(data), **DATA}}
    pretrain = {"_base_": "dataset.yaml", "model": TINY_MODEL, "method": TINY_METHOD,
                "train": {"epochs": 1, "batch_size": 8, "checkpoint_every": 2, "log_every": 1, "figure_samples": 2,
                          "knn_every": 1, "knn_samples": 20}}
    finetune = {"_base_": "dataset.yaml", "model": {**VIT, "top_k": 3},
                "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, "warmup_steps": 0, "checkpoint_every": 2}}
    study = {
        "output_dir": str(folder / "study"), "dataset": str(folder / "dataset.yaml"), "seeds": seeds,
        "pretrain": {"config": str(folder / "pretrain.yaml"), "epochs": 2,
                     "arms": {"mocov3": {"method.local.weight": 0}, "lodisc": {"method.local.view": "zero_fill"}}},
        "evaluate": {"knn": ["knn.ks=[20]", "features.batch_size=8"], "linear": ["linear.lrs=[0.1, 1.0]"]},
        "finetune": {"arms": {"glsim": {"config": str(folder / "finetune.yaml")},
                              "ila": {"config": str(folder / "finetune.yaml"), "model.adapter": "ila",
                                      "model.head": "vit", "model.adapter_positions": [0]}}},
    }
    if not finetune_arms:  # the supervised reference then needs its own recipe
        study["finetune"]["arms"], study["supervised"] = {}, {"config": str(folder / "finetune.yaml")}
    for name, recipe in (("dataset", dataset), ("pretrain", pretrain), ("finetune", finetune), ("study", study)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return folder / "study.yaml"


def test_study_runs_every_arm_and_reports_them(tiny_data: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_recipes(tiny_data, tmp_path, seeds=[0, 1])
    assert run_cli(study_module.main, ["--config", str(config)]) == 0
    root = tmp_path / "study"
    for seed in (0, 1):
        for arm in ("mocov3", "lodisc"):
            summary = json.loads((root / f"seed{seed}" / arm / "summary.json").read_text())
            assert summary["step"] == 6  # 24 images, batch 8, the study's 2 epochs for every arm
            records = [json.loads(x) for x in (root / f"seed{seed}" / arm / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in records if "online_knn.k20.top1" in r] == [0, 3, 6]
            knn = json.loads((root / f"seed{seed}/{arm}/eval/knn.json").read_text())
            assert {"knn.k20.top1", "retrieval.mAP"} <= knn.keys()
            assert 0 <= knn["val.knn.k20.top1"] <= 1 and knn["protocol.val_query_split"].startswith("train (strat")
        assert "linear.top1" in json.loads((root / f"seed{seed}/random/eval/linear.json").read_text())
        for kind in ("knn", "linear"):  # raw pixels at every image size, both protocols, no network
            pixels = json.loads((root / f"seed{seed}/pixels/eval/{kind}.json").read_text())
            assert pixels["features"] == "pixels" and pixels["init"] == "none (raw pixels)"
        assert not (root / f"seed{seed}/pixels/eval/features").exists()  # nothing cached: the images are the features
        # the supervised reference: the first arm's ViT from scratch with labels, for the pretraining epochs
        supervised = json.loads((root / f"seed{seed}/supervised/metrics.json").read_text())
        assert (supervised["init"], supervised["head"], supervised["epochs"], supervised["step"]) == \
            ("scratch", "vit", 2, 6)
        assert supervised["backbone_kwargs"]["embed_dim"] == TINY_MODEL["kwargs"]["embed_dim"]
        for kind in ("knn", "linear"):
            assert json.loads((root / f"seed{seed}/supervised/eval/{kind}.json").read_text())["init"].endswith(
                f"seed{seed}/supervised/backbone.safetensors")
        ila = json.loads((root / f"seed{seed}/finetune/ila/metrics.json").read_text())
        glsim = json.loads((root / f"seed{seed}/finetune/glsim/metrics.json").read_text())
        assert ila["params.trainable"] < glsim["params.trainable"] and glsim["train.images_per_second"] > 0
        best = Study(load_config(config, [], StudyConfig)).best_pretrain_arm()
        assert ila["init"].endswith(f"seed{seed}/{best}/backbone.safetensors")

    report = (root / "report" / "report.md").read_text()
    for heading in ("## Frozen features", "### Differences", "## Fine-tuning", "## Protocols", "## Commands"):
        assert heading in report, heading
    for row in ("| pixels |", "| random |", "| supervised |", "| mocov3 |", "| lodisc |", "| glsim |", "| ila |"):
        assert row in report, row
    for heading in ("## Supervised reference", "### Which split chose what"):
        assert heading in report, heading
    # every arm's row says in words how it stands against each floor, on both protocols
    lodisc = next(line for line in report.splitlines() if line.startswith("| lodisc | `method")).split(" | ")[6]
    knn_words, linear_words = lodisc.split(" · ")
    assert knn_words.startswith("kNN: ") and linear_words.startswith("linear: ")
    for words in (knn_words, linear_words):
        assert all(floor in words for floor in ("random", "pixels", "supervised"))
        assert any(p in words for p in ("beats", "loses to", "not distinguishable from"))
    assert "- **fine-tuning init**: mean kNN k20 top-1 over the seeds on `train (stratified" in report
    assert "- **test split** `test`: read only for the reported numbers" in report
    assert "beyond the seed spread" not in report and "not distinguishable at 2 seeds" in report
    assert "± " in report  # two seeds: mean ± std
    for figure in ("curves.png", "masks_lodisc.png", "crops_glsim.png", "knn_neighbours.png", "embedding_map.png"):
        assert (root / "report" / figure).stat().st_size > 1000 and f"]({figure})" in report, figure
    assert "python train_ssl.py --config" in report and "python -m eval.finetune --config" in report

    # The report is rebuilt from the finished runs alone.
    (root / "report" / "report.md").unlink()
    assert run_cli(report_main, [str(root)]) == 0
    assert (root / "report" / "report.md").read_text() == report


def test_killed_study_continues_without_redoing_finished_arms(tiny_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_recipes(tiny_data, tmp_path, seeds=[0])
    root = tmp_path / "study"
    first = root / "done" / "seed0.pretrain.mocov3.json"
    proc = subprocess.Popen([sys.executable, "-m", "sslfg.study", "--config", str(config)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_file(), "the study never finished its first arm"
    assert not (root / "report").exists()
    weights = root / "seed0" / "mocov3" / "backbone.safetensors"
    before = (weights.stat().st_mtime_ns, first.read_text())

    ran = []
    entry_points = dict(study_module.ENTRY_POINTS)
    for kind, (typed, main) in entry_points.items():
        monkeypatch.setitem(study_module.ENTRY_POINTS, kind,
                            (typed, lambda argv, main=main, kind=kind: (ran.append((kind, argv)), main(argv))))
    assert run_cli(study_module.main, ["--config", str(config)]) == 0
    assert (weights.stat().st_mtime_ns, first.read_text()) == before
    assert not any(kind == "pretrain" and "method.local.weight=0" in argv for kind, argv in ran)
    assert sum(kind == "pretrain" for kind, _ in ran) == 1  # lodisc only
    assert (root / "report" / "report.md").is_file()
    for arm in ("knn.mocov3", "pretrain.lodisc", "knn.random", "finetune.glsim", "finetune.ila"):
        assert (root / "done" / f"seed0.{arm}.json").is_file(), arm


def test_a_finished_arm_whose_result_is_gone_runs_again(tiny_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Old code: an arm with a done record was skipped though its result file had been deleted, and the report
    then counted one seed fewer for it without a word."""
    study = Study(load_config(write_recipes(tiny_data, tmp_path, seeds=[0]), [], StudyConfig))
    ran = []
    for kind, (name, _) in study_module.ENTRY_POINTS.items():
        monkeypatch.setitem(study_module.ENTRY_POINTS, kind, (name, ran.append))
    for arm in [*study.pretrain_arms(0, 2), *study.eval_arms(0, "lodisc", ["--checkpoint", "x"]),
                *study.finetune_arms(0, "lodisc")]:
        write_json(done_path(study.root, arm.id), {"id": arm.id, "command": arm.command, "seconds": 1.0})
        write_json(arm.result, {})
        study.run_arm(arm)
        assert ran == [], arm.id  # finished: skipped
        arm.result.unlink()
        study.run_arm(arm)
        assert ran == [arm.argv], arm.id  # its result gone: run again
        ran.clear()


def test_a_finished_arm_of_another_command_is_refused_not_skipped(tiny_data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Old code: a continued study skipped every arm with a done record, whatever command it had run. Seen on the
    sample study extended from 1 to 3 seeds: the best pretraining arm changed, seeds 1-2 fine-tuned from it, seed 0's
    fine-tuning arms (from the old best) were skipped, and the report gave the three seeds one init."""
    study = Study(load_config(write_recipes(tiny_data, tmp_path, seeds=[0]), [], StudyConfig))
    for kind, (name, _) in study_module.ENTRY_POINTS.items():
        monkeypatch.setitem(study_module.ENTRY_POINTS, kind, (name, lambda argv: pytest.fail(f"ran {argv}")))
    arm, then = study.finetune_arms(0, "lodisc")[0], study.finetune_arms(0, "mocov3")[0]
    done = done_path(study.root, arm.id)
    write_json(done, {"id": arm.id, "command": arm.command, "seconds": 1.0})
    write_json(arm.result, {"test.top1": 0.5})
    study.run_arm(arm)  # the same command: skipped
    write_json(done, {"id": arm.id, "command": then.command, "seconds": 1.0})
    with pytest.raises(ConfigError) as err:
        study.run_arm(arm)
    message = str(err.value)
    assert message.startswith(f"study arm {arm.id} finished earlier with another command") and \
        f"then: init={study.root / 'seed0' / 'mocov3'}; now: init={study.root / 'seed0' / 'lodisc'})" in message and \
        f"remove {done} and {study.root / 'seed0' / 'finetune' / 'glsim'}" in message, message
    # an arm's overrides edited in the recipe between two runs of the study
    edited = Study(load_config(write_recipes(tiny_data, tmp_path, seeds=[0]), 
                               ["pretrain.arms={mocov3: {method.local.weight: 0, train.base_lr: 0.5}, lodisc: {}}"],
                               StudyConfig))
    arm = edited.pretrain_arms(0, 2)[0]
    write_json(done_path(edited.root, arm.id), {"id": arm.id, "command": study.pretrain_arms(0, 2)[0].command})
    with pytest.raises(ConfigError, match=r"then: –; now: train.base_lr=0.5\)"):
        edited.run_arm(arm)


def test_a_budget_in_minutes_is_timed_once_and_kept(tiny_data: Path, tmp_path: Path) -> None:
    config = write_recipes(tiny_data, tmp_path, seeds=[0], finetune_arms=False)
    cfg = load_config(config, ["pretrain.epochs=0", "pretrain.minutes=0.2", "evaluate.run_linear=false",
                               "supervised.enabled=false"], StudyConfig)
    Study(cfg).run()
    root = tmp_path / "study"
    budget = json.loads((root / "budget.json").read_text())
    per_step = budget["seconds_per_step"]
    assert set(per_step) == {"mocov3", "lodisc"} and budget["steps_per_epoch"] == 3
    assert budget["epochs"] == max(1, math.floor(0.2 * 60 / (sum(per_step.values()) * 3)))
    for arm in ("mocov3", "lodisc"):
        assert json.loads((root / "seed0" / arm / "summary.json").read_text())["total_steps"] == 3 * budget["epochs"]
    # A continued study (here: another seed) keeps the stored budget instead of timing again (seed 0's finished
    # arms would now be refused: their commands have the budget they ran with).
    (root / "budget.json").write_text(json.dumps({**budget, "epochs": 2}))
    cfg.seeds = [1]
    Study(cfg).run()
    assert json.loads((root / "seed1" / "mocov3" / "summary.json").read_text())["total_steps"] == 6


def test_a_shorter_budget_gets_its_own_warm_up_for_every_arm(tiny_data: Path, tmp_path: Path) -> None:
    """pretrain.epochs below a recipe's warm-up is refused at start-up, naming the key; pretrain.warmup_epochs
    gives every pretraining arm (not the supervised reference: its recipe's warm-up is in steps) another."""
    config = write_recipes(tiny_data, tmp_path, seeds=[0])
    recipe = yaml.safe_load((tmp_path / "pretrain.yaml").read_text())
    recipe["train"] |= {"epochs": 8, "warmup_epochs": 2}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"pretrain.arms.mocov3: .*train.warmup_epochs = 2.0 must be below "
                                          r"train.epochs = 2"):
        Study(load_config(config, [], StudyConfig))
    study = Study(load_config(config, ["pretrain.warmup_epochs=0.5"], StudyConfig))
    trainings = [arm for arm in study.pretrain_arms(seed=0, epochs=2) if arm.kind == "pretrain"]
    assert len(trainings) == 2 and all("train.epochs=2" in arm.argv and "train.warmup_epochs=0.5" in arm.argv
                                       for arm in trainings)
    recipe_only = Study(load_config(config, ["pretrain.epochs=0"], StudyConfig)).pretrain_arms(0, 0)[0].argv
    assert not any(a.startswith(("train.epochs=", "train.warmup_epochs=")) for a in recipe_only)


def test_a_bad_arm_stops_the_study_before_any_training(tiny_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_recipes(tiny_data, tmp_path, seeds=[0])
    with pytest.raises(ConfigError, match=r"pretrain.arms.typo: .*model.keep_ratoi"):
        Study(load_config(config, ["pretrain.arms={typo: {model.keep_ratoi: 0.5}}"], StudyConfig))
    with pytest.raises(ConfigError, match=r"finetune.arms.glsim.init: 'nope'"):
        Study(load_config(config, ["finetune.arms.glsim.init=nope"], StudyConfig))
    with pytest.raises(ConfigError, match=r"pretrain.arms: pixels is the name of a floor the study adds itself"):
        Study(load_config(config, ["pretrain.arms={pixels: {}}"], StudyConfig))
    for kind, typo in (("knn", "bogus=1"), ("linear", "linear.epoch=3")):  # old code: found after the first arm
        with pytest.raises(ConfigError, match=rf"evaluate.{kind}: unknown key '{typo.split('=')[0]}'"):
            Study(load_config(config, [f"evaluate.{kind}=[{typo}]"], StudyConfig))
    # no fine-tuning arm to take the supervised reference's recipe from: one line naming the key and both ways out
    bare = write_recipes(tiny_data, tmp_path / "bare", seeds=[0], finetune_arms=False)
    assert run_cli(study_module.main, ["--config", str(bare), "supervised.config=", "pretrain.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: supervised.config: no fine-tuning recipe") and \
        "supervised.enabled=false" in err
    assert not (tmp_path / "study").exists() and not (tmp_path / "bare" / "study").exists()


def test_a_repeated_seed_is_refused_and_reported_once(tiny_data: Path, tmp_path: Path) -> None:
    """Old code: seeds=[0, 1, 0] trained seed 0 once and counted its results twice in every verdict: equal paired
    differences narrow the t interval (two equal ones give a zero-width interval, 'better' or 'worse' from one seed)."""
    config = write_recipes(tiny_data, tmp_path, seeds=[0, 1, 0])
    with pytest.raises(ConfigError, match=r"seeds: \[0, 1, 0\] lists seed 0 more than once.*list each seed once"):
        Study(load_config(config, [], StudyConfig))
    old = tmp_path / "old_study"  # a study folder written before the check: its report counts each seed once
    old.mkdir()
    (old / "study.yaml").write_text(config.read_text())
    assert Report(old).seeds == [0, 1]


@pytest.mark.parametrize(("section", "name"), [("pretrain", "../escape"), ("pretrain", ".."), ("pretrain", "a/b"),
                                               ("finetune", "x/../../y"), ("finetune", "."), ("pretrain", " lead"),
                                               ("pretrain", "finetune")])
def test_an_arm_name_that_is_not_a_folder_of_its_own_is_refused(section: str, name: str, tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    """Old code: an arm named 'a/b' or '../escape' trained in a folder below or outside its seed folder (the name
    is the arm's folder), and a pretraining arm named 'finetune' in seed<s>/finetune among the fine-tuning arms."""
    config = write_recipes(tiny_data, tmp_path, seeds=[0])
    with pytest.raises(ConfigError, match=rf"^{section}\.arms: .*(not a plain folder name|the fine-tuning arms' f)"):
        Study(load_config(config, [f"{section}.arms={{{json.dumps(name)}: {{}}}}"], StudyConfig))
    assert not (tmp_path / "study").exists()


def test_report_needs_a_study_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no study.yaml"):
        build_report(tmp_path)


def test_study_under_two_processes_runs_every_arm_on_both(tiny_data: Path, tmp_path: Path) -> None:
    config = write_recipes(tiny_data, tmp_path, seeds=[0])
    finish(start(command(["-m", "sslfg.study", "--config", str(config), "evaluate.run_linear=false"], processes=2)))
    root = tmp_path / "study"
    for arm in ("mocov3", "lodisc"):
        summary = json.loads((root / "seed0" / arm / "summary.json").read_text())
        assert summary["num_processes"] == 2 and summary["global_batch"] == 16
    assert json.loads((root / "seed0/finetune/glsim/metrics.json").read_text())["test.top1"] >= 0
    assert (root / "report" / "report.md").is_file() and "2 process(es)" in (root / "report/report.md").read_text()


@pytest.mark.slow  # about 30 s
def test_a_study_on_data_with_boxes_reports_where_each_arm_looks(tmp_path: Path) -> None:
    data = write_boxed_dataset(tmp_path / "boxed")
    config = write_recipes(data, tmp_path, seeds=[0])
    for name, section, keys in (("dataset", "data", {"boxes": True}),
                                ("pretrain", "train", {"loc_every": 1, "loc_samples": 8})):
        recipe = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        recipe[section] |= keys
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
    study = yaml.safe_load(config.read_text())
    study["evaluate"]["run_linear"] = False
    study["finetune"]["arms"].pop("ila")
    config.write_text(yaml.safe_dump(study))
    assert run_cli(study_module.main, ["--config", str(config), "pretrain.epochs=1"]) == 0

    root = tmp_path / "study"
    for arm in ("mocov3", "lodisc", "random"):
        assert 0 <= json.loads((root / f"seed0/{arm}/eval/localise.json").read_text())["loc.keep_precision"] <= 1
    report = (root / "report" / "report.md").read_text()
    section = report.split("## Localisation")[1].split("## Fine-tuning")[0]
    for row in ("| random | 1 |", "| mocov3 | 1 |", "| lodisc | 1 |"):
        assert row in section, row
    lodisc = next(line for line in section.splitlines() if line.startswith("| lodisc |")).split(" | ")
    loc = json.loads((root / "seed0/lodisc/eval/localise.json").read_text())
    assert lodisc[2] == str(loc["protocol.keep_ratio"])  # the ratio the arm trained with
    assert lodisc[3] == f"{100 * loc['loc.keep_precision']:.2f}" and lodisc[5] == f"{loc['loc.keep_lift']:.2f}"
    records = [json.loads(x) for x in (root / "seed0/lodisc/metrics.jsonl").read_text().splitlines()]
    last = [r["online_loc.keep_precision"] for r in records if "online_loc.keep_precision" in r][-1]
    assert lodisc[-1].strip(" |") == f"{100 * last:.2f}"
    glsim = json.loads((root / "seed0/finetune/glsim/metrics.json").read_text())
    assert f"| glsim | 1 | {100 * glsim['test.gls_iou']:.2f} | {100 * glsim['test.gls_coverage']:.2f} |" in report
    assert "python -m eval.localise --checkpoint" in report and "](localise_lodisc.png)" in report
    assert (root / "report" / "curves.png").stat().st_size > 1000


def test_an_arm_with_vs_is_also_compared_with_that_arm(tiny_data: Path, tmp_path: Path) -> None:
    """`vs: other` adds the row arm − other to the differences: the mean of the per-seed kNN and linear
    differences (points of %) with its 95 % t interval, and the verdict in words; a `vs` that names no
    other arm is refused."""
    config = write_recipes(tiny_data, tmp_path, seeds=[0, 1, 2], finetune_arms=False)
    arms = "pretrain.arms={mocov3: {method.local.weight: 0}, byol: {}, byol_local: {vs: byol}}"
    cfg = load_config(config, [arms], StudyConfig)
    study = Study(cfg)  # a valid vs passes the checks, and is not passed to the run as a setting
    assert not any(a.startswith("vs=") for arm in study.pretrain_arms(0, 1) for a in arm.argv)
    root = Path(cfg.output_dir)
    study_module.save_config(cfg, root / study_module.STUDY_FILE)
    knn = {"mocov3": [0.50, 0.52, 0.51], "byol": [0.40, 0.45, 0.41], "byol_local": [0.46, 0.47, 0.49]}
    lin = {"mocov3": [0.6, 0.6, 0.6], "byol": [0.5, 0.5, 0.5], "byol_local": [0.51, 0.49, 0.53]}
    write_evals(root, knn, lin)
    text = (build_report(root) / "report.md").read_text()

    def check(a: str, b: str) -> None:
        """The row's cells: mean [mean ∓ t(0.975, 2) · s / √3], hand-computed with t from a table, and the verdict."""
        line = next(x for x in text.splitlines() if x.startswith(f"| {a} | {b} |")).split(" | ")
        for metric, cell, verdict in ((knn, line[2], line[3]), (lin, line[4], line[5])):
            d = [100 * (x - y) for x, y in zip(metric[a], metric[b], strict=True)]
            m = sum(d) / 3
            h = 4.302652729911275 * math.sqrt(sum((x - m) ** 2 for x in d) / 2) / math.sqrt(3)
            numbers = [float(v) for v in cell.strip("]").replace("[", ",").split(",")]
            assert numbers == pytest.approx([m, m - h, m + h], abs=0.006)  # printed to 2 decimals
            word = "better" if m - h > 0 else "worse" if m + h < 0 else "not distinguishable at 3 seeds"
            assert verdict.startswith(word), (verdict, word)

    # kNN +5.33 ± 3.06: the old rule's "beyond the spread"; at 95 % ± 4.3027 · 3.055 / √3 = ± 7.59, undecided; at
    # 4 seeds t(0.975, 3) · 3.055 / √4 = 3.182 · 1.528 = 4.86 < 5.33
    assert "| byol_local | byol | +5.33 [-2.26, 12.92] | not distinguishable at 3 seeds (the margin would need 4) |" \
        in text
    for a, b in (("byol_local", "byol"), ("byol_local", "mocov3"), ("byol", "mocov3")):
        check(a, b)
    assert "| byol | byol |" not in text and "vs=" not in text
    with pytest.raises(ConfigError, match=r"pretrain.arms.byol_local.vs: 'nope' is not another pretraining arm"):
        Study(load_config(config, [arms.replace("vs: byol", "vs: nope")], StudyConfig))


def write_evals(root: Path, knn: dict[str, list[float]], lin: dict[str, list[float]], val_knn: dict | None = None
                ) -> None:
    """knn.json and linear.json of each arm and seed with the given top-1s (what the report reads)."""
    for arm in knn:
        for seed, value in enumerate(knn[arm]):
            out = root / f"seed{seed}" / arm / "eval"
            out.mkdir(parents=True)
            common = {"feature": "cls", "image_size": 16}  # what the Protocols section reads
            val = {"val.knn.k20.top1": val_knn[arm][seed]} if val_knn else {}
            (out / "knn.json").write_text(json.dumps({"knn.k20.top1": value, **val, **common}))
            (out / "linear.json").write_text(json.dumps({"linear.top1": lin[arm][seed], **common}))


def test_the_fine_tuning_init_is_chosen_on_validation_not_test(tmp_path: Path) -> None:
    """The arm best on test but not on validation is not the one fine-tuning starts from (the old rule chose it)."""
    write_evals(tmp_path, {"a": [0.9], "b": [0.5]}, {"a": [0.5], "b": [0.5]}, val_knn={"a": [0.4], "b": [0.6]})
    assert best_pretrain_arm(tmp_path, [0], ["a", "b"]) == "b"
    assert best_pretrain_arm(tmp_path / "none", [0], ["a", "b"]) is None


def test_a_damaged_arm_result_is_one_error_naming_it(tmp_path: Path) -> None:
    """A knn.json cut short was a JSONDecodeError traceback of the report (best_pretrain_arm), a metrics.jsonl line
    cut short one of its curves."""
    write_evals(tmp_path, {"a": [0.9, 0.8]}, {"a": [0.5, 0.5]}, val_knn={"a": [0.4, 0.5]})
    result = tmp_path / "seed1/a/eval/knn.json"
    result.write_text(result.read_text()[:20])
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(result))}: this file of an sslfg run cannot be read "
                                          r"\(Expecting.*run the study again"):
        best_pretrain_arm(tmp_path, [0, 1], ["a"])
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 0, "loss": 1.0}\n{"step": 20, "lo\n{"step": 40, "loss": 0.5}\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(log))}, line 2: .*remove that line"):
        read_metrics_log(log)
    log.write_text('{"step": 0, "loss": 1.0}\n')
    assert read_metrics_log(log) == [{"step": 0, "loss": 1.0}] and read_metrics_log(tmp_path / "none.jsonl") == []


def test_one_seed_compares_by_bootstrap_over_the_test_images(tiny_data: Path, tmp_path: Path) -> None:
    """With one seed, the verdict comes from the paired bootstrap of the per-image records; an arm right on
    every image beats one right on none, and arms without records get no verdict."""
    config = write_recipes(tiny_data, tmp_path, seeds=[0], finetune_arms=False)
    cfg = load_config(config, [], StudyConfig)
    root = Path(cfg.output_dir)
    study_module.save_config(cfg, root / study_module.STUDY_FILE)
    write_evals(root, {"mocov3": [0.0], "lodisc": [1.0]}, {"mocov3": [0.5], "lodisc": [0.5]})
    for arm, hit in (("mocov3", False), ("lodisc", True)):
        hits = {"knn.k20.top1": torch.full((40,), hit)}
        write_correct(correct_path(root / "seed0" / arm / "eval", "knn"), "test", hits)
    text = (build_report(root) / "report.md").read_text()
    assert "| lodisc | mocov3 | +100.00 [100.00, 100.00] | better | – | – |" in text


def test_study_data_keys_reach_every_arm_and_the_shards_give_the_folders_numbers(tiny_data: Path,
                                                                                  tmp_path: Path) -> None:
    """`data: {format: shards, root: ...}` runs the same study on a sharded copy without copying the recipes: every
    command gets the keys (before the arm's own), the report names them, and an evaluation reads the same images."""
    sharded = tmp_path / "shards"
    shards.write_shards(DataConfig(root=str(tiny_data), train_split="train"), str(sharded), 1.0)
    study = write_recipes(tiny_data, tmp_path / "recipes", seeds=[0])
    keys = ["data.format=shards", f"data.root={sharded}"]
    plans = {}
    for name, extra in (("folder", []), ("shards", [f"data={{format: shards, root: {sharded}}}"])):
        plans[name] = Study(load_config(str(study), [f"output_dir={tmp_path / 'study' / name}", *extra],
                                          StudyConfig))  # not in the shards folder: a dataset it reads
    s = plans["shards"]
    arms = [*s.pretrain_arms(0, 2), *s.floor_arms(0), *s.supervised_arms(0, 2), *s.finetune_arms(0, "mocov3")]
    assert {a.kind for a in arms} == {"pretrain", "knn", "linear", "finetune"}
    for arm in arms:
        assert arm.argv[arm.argv.index(keys[0]):][:2] == keys, arm.command
    assert s.data.format == "shards" and s.data.root == str(sharded)
    for plan in plans.values():  # the raw-pixel kNN floor, no training: the same numbers from both layouts
        plan.run_arm(next(a for a in plan.floor_arms(0) if a.id.endswith("knn.pixels")))
    knn = [json.loads((tmp_path / "study" / n / "seed0/pixels/eval/knn.json").read_text()) for n in plans]
    same = ("knn.k20.top1", "retrieval.mAP", "protocol.queries", "protocol.bank_size")
    assert [knn[0][k] for k in same] == [knn[1][k] for k in same] and knn[1]["protocol.queries"] > 0
    # a misspelt data key is one error naming the study's key before anything runs
    with pytest.raises(ConfigError, match=r"^data: .*data\.formt"):
        Study(load_config(str(study), [f"output_dir={tmp_path / 'x'}", "data={formt: shards}"], StudyConfig))
