"""One command for the whole comparison: pretraining arms → frozen-feature evaluations and floors →
fine-tuning arms → report.

    python -m sslfg.study --config configs/study/sample.yaml
    python -m sslfg.study --config configs/study/cub.yaml seeds=[1,2,3]
    accelerate launch -m sslfg.study --config configs/study/cub.yaml     # every arm on all processes
    python -m sslfg.study.report runs/study_sample                       # rebuild the report only

Every arm runs through its real command (sslfg.commands: pretrain, knn, linear, finetune, and localise
when the dataset has object boxes) in this process, with the command line it would take on its own
(`python train_ssl.py ...`, `python -m eval.knn ...`); that command is recorded with its result. A
finished arm is skipped when the study runs again; an unfinished pretraining or fine-tuning arm
continues from its newest checkpoint (they all run with resume=auto). A stop signal (SIGTERM, SIGUSR1,
Ctrl-C) ends the arm in flight with a checkpoint and the study with that arm's exit status; the same
command then continues the study where it stopped.

Equal budget: every pretraining arm trains the same epochs at the same batch, hence the same
optimizer steps; every fine-tuning arm likewise. Floors: random init of the first arm's architecture,
raw pixels (kNN and linear, at every image size), and the supervised reference: that architecture
trained from scratch with labels (eval.finetune, plain head) for the pretraining arms' epochs, then
evaluated frozen like them (`supervised.enabled=false` drops it). Fine-tuning starts from the
pretraining arm with the best mean kNN k20 top-1 on the validation split (bank: train, queries:
val, or a part of the train split held out by seed; eval.knn knn.val=true), or the arm named in its
`init`; the test split is read only for the reported numbers.

The console command `sslfg-study` takes the same arguments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from sslfg.cli import USER_ERRORS, parse_cli
from sslfg.commands import finetune as finetune_command
from sslfg.commands import knn as knn_command
from sslfg.commands import linear as linear_command
from sslfg.commands import localise as localise_command
from sslfg.commands import pretrain as pretrain_command
from sslfg.config import ConfigError, load_config, save_config
from sslfg.data.datasets import build_dataset
from sslfg.distributed import is_main_process, world_size
from sslfg.engine.preemption import Interrupted
from sslfg.engine.rundir import check_output_dir, claim_run_dir, ensure_writable, release_run_dir
from sslfg.files import write_json
from sslfg.schema import EvalConfig, FinetuneConfig, PretrainConfig, StudyConfig
from sslfg.study.layout import (
    STUDY_FILE,
    SUPERVISED,
    VAL_KNN_KEY,
    arm_id,
    best_pretrain_arm,
    check_arm_name,
    done_path,
    eval_dir,
    finetune_dir,
    pretrain_dir,
    read_json,
    split_spec,
)
from sslfg.study.report import build_report

log = logging.getLogger(__name__)

# kind -> (how a user types the entry point, its main(argv))
ENTRY_POINTS: dict[str, tuple[str, Callable[[Sequence[str] | None], object]]] = {
    "pretrain": ("python train_ssl.py", pretrain_command.main),
    "knn": ("python -m eval.knn", knn_command.main),
    "linear": ("python -m eval.linear", linear_command.main),
    "finetune": ("python -m eval.finetune", finetune_command.main),
    "localise": ("python -m eval.localise", localise_command.main),
}
RESULT_FILES = {"pretrain": "summary.json", "knn": "knn.json", "linear": "linear.json", "finetune": "metrics.json",
                "localise": "localise.json"}
CALIBRATION_STEPS = 5  # optimizer steps timed per pretraining arm for a budget in minutes


@dataclass
class Arm:
    """One run of one entry point."""

    id: str
    kind: str
    argv: list[str]

    @property
    def command(self) -> str:
        return f"{ENTRY_POINTS[self.kind][0]} {shlex.join(self.argv)}"

    @property
    def result(self) -> Path | None:
        """The file the arm's run writes last, which the report reads (None: no output_dir among its arguments)."""
        folder = next((a.partition("=")[2] for a in self.argv if a.startswith("output_dir=")), "")
        return Path(folder) / RESULT_FILES[self.kind] if folder else None


def check_same_command(arm: Arm, done: Path) -> None:
    """ConfigError when the finished arm recorded in `done` ran another command than `arm`'s: skipping it would
    report its results under settings they were not run with (an arm's overrides edited in the recipe; a
    fine-tuning arm whose best pretraining arm changed as seeds were added, the seeds then starting from
    different arms)."""
    then = (read_json(done) or {}).get("command", arm.command)
    if then == arm.command:
        return
    before, now = shlex.split(then), shlex.split(arm.command)
    folder = next((a.partition("=")[2] for a in arm.argv if a.startswith("output_dir=")), "its output_dir")
    raise ConfigError(
        f"study arm {arm.id} finished earlier with another command than this study gives it now (then: "
        f"{shlex.join(a for a in before if a not in now) or '–'}; now: "
        f"{shlex.join(a for a in now if a not in before) or '–'}), "
        f"so its results would be reported under settings they were not run with: remove {done} and {folder} to "
        f"run it again, or restore the settings it ran with (a fine-tuning arm can name its pretraining arm with "
        f"`init:`), or give the study another output_dir")


def overrides(settings: dict[str, Any]) -> list[str]:
    """{dotted key: value} → key=value arguments: JSON (valid YAML), or a string as is when YAML
    reads it back unchanged (paths)."""
    def text(value: Any) -> str:
        return value if isinstance(value, str) and value and yaml.safe_load(value) == value else json.dumps(value)

    return [f"{key}={text(value)}" for key, value in settings.items()]


def _check(schema: type, config: str, args: list[str], where: str, data_root: str | None) -> Any:
    """Loads an arm's config now, so that a typo in the last arm stops the study before the first; its data.root
    must be `data_root` (None: not checked)."""
    try:
        cfg = load_config(config or None, args, schema)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if data_root is not None and os.path.normpath(cfg.data.root) != os.path.normpath(data_root):
        raise ConfigError(f"{where}: its recipe trains on data.root '{cfg.data.root}' but the study's dataset is "
                          f"'{data_root}'; every arm must use the same data")
    return cfg


class Study:
    """The plan of a study and the code that runs it."""

    def __init__(self, cfg: StudyConfig) -> None:
        if not cfg.dataset:
            raise ConfigError("dataset: the study needs a dataset recipe, e.g. configs/datasets/sample.yaml")
        if not cfg.pretrain.arms:
            raise ConfigError("pretrain.arms: the study needs at least one pretraining arm")
        if not cfg.seeds:
            raise ConfigError("seeds: the study needs at least one seed")
        if repeated := sorted({seed for seed in cfg.seeds if cfg.seeds.count(seed) > 1}):
            raise ConfigError(f"seeds: {cfg.seeds} lists seed {', '.join(map(str, repeated))} more than once; a "
                              "repeated seed runs nothing new but counts its results again, which narrows the "
                              "verdicts' intervals without evidence: list each seed once")
        self.cfg, self.root = cfg, Path(cfg.output_dir)
        self.data_args = overrides({f"data.{key}": value for key, value in cfg.data.items()})
        self.data = _check(EvalConfig, cfg.dataset, self.data_args, "data", None).data
        if self.data.format == "folder" or not self.data.labels:  # the study's evaluations would fail after training
            raise ConfigError(f"dataset: the study evaluates every arm with labels (kNN, linear probe, fine-tuning), "
                              f"and {cfg.dataset} has none (data.format={self.data.format}, data.labels="
                              f"{str(self.data.labels).lower()}); name a labelled dataset recipe, and withhold its "
                              "labels from a pretraining arm with data.labels: false")
        for kind in ("knn", "linear"):  # a typo here stops the study now, not after its first pretraining arm
            _check(EvalConfig, cfg.dataset, [*self.data_args, *getattr(cfg.evaluate, kind)], f"evaluate.{kind}", None)
        for section in ("pretrain", "finetune"):
            for name in getattr(cfg, section).arms:
                check_arm_name(section, name)
        for name, spec in cfg.pretrain.arms.items():
            vs = split_spec(name, spec, "pretrain")[0].get("vs")
            if vs is not None and (vs == name or vs not in cfg.pretrain.arms):
                raise ConfigError(f"pretrain.arms.{name}.vs: '{vs}' is not another pretraining arm "
                                  f"({', '.join(a for a in cfg.pretrain.arms if a != name)})")
            _check(PretrainConfig, *self._pretrain_args(name, spec, cfg.seeds[0], cfg.pretrain.epochs), self.data.root)
        for name, spec in cfg.finetune.arms.items():
            own, _ = split_spec(name, spec, "finetune")
            if own.get("init", "best") not in ("best", "scratch", *cfg.pretrain.arms):
                raise ConfigError(f"finetune.arms.{name}.init: '{own['init']}' is not best, scratch or a pretraining "
                                  f"arm ({', '.join(cfg.pretrain.arms)})")
            _check(FinetuneConfig, *self._finetune_args(name, spec, cfg.seeds[0], ""), self.data.root)
        if cfg.supervised.enabled:
            _check(FinetuneConfig, *self._supervised_args(cfg.seeds[0], cfg.pretrain.epochs), self.data.root)

    # ---- the arms ----------------------------------------------------------------------------

    def _pretrain_args(self, name: str, spec: Any, seed: int, epochs: int) -> tuple[str, list[str], str]:
        own, settings = split_spec(name, spec, "pretrain")
        warmup = self.cfg.pretrain.warmup_epochs
        budget = {**({"train.epochs": epochs} if epochs else {}),
                  **({"train.warmup_epochs": warmup} if warmup >= 0 else {})}
        run = {"seed": seed, "output_dir": str(pretrain_dir(self.root, seed, name)), "resume": "auto"}
        return own.get("config", self.cfg.pretrain.config), \
            [*self.data_args, *overrides({**settings, **budget, **run})], f"pretrain.arms.{name}"

    def _finetune_args(self, name: str, spec: Any, seed: int, init: str) -> tuple[str, list[str], str]:
        own, settings = split_spec(name, spec, "finetune")
        budget = {"train.epochs": self.cfg.finetune.epochs} if self.cfg.finetune.epochs else {}
        run = {"seed": seed, "init": init, "output_dir": str(finetune_dir(self.root, seed, name)), "resume": "auto"}
        return own.get("config", ""), [*self.data_args, *overrides({**settings, **budget, **run})], \
            f"finetune.arms.{name}"

    def _supervised_args(self, seed: int, epochs: int) -> tuple[str, list[str], str]:
        """The supervised reference's fine-tuning recipe and overrides: the first pretraining arm's ViT (name,
        patch, kwargs), plain head, no adapter, random init, for that arm's epochs."""
        sup, where = self.cfg.supervised, "supervised"
        config, settings = sup.config, sup.settings
        if not config:
            if not self.cfg.finetune.arms:
                raise ConfigError(f"{where}.config: no fine-tuning recipe to train the supervised reference with "
                                  "(and no fine-tuning arm to take one from); name one, e.g. "
                                  "configs/finetune/glsim_sample.yaml, or set supervised.enabled=false")
            name, spec = next(iter(self.cfg.finetune.arms.items()))
            own, arm_settings = split_spec(name, spec, "finetune")
            config, settings = own.get("config", ""), {**arm_settings, **settings}
        first, spec = next(iter(self.cfg.pretrain.arms.items()))
        pretrain = _check(PretrainConfig, *self._pretrain_args(first, spec, seed, epochs), self.data.root)
        m = pretrain.model
        model = {"model.name": m.name, "model.patch_size": m.patch_size, "model.kwargs": m.kwargs,
                 "model.head": "vit", "model.adapter": "none"}
        run = {"seed": seed, "init": "", "train.epochs": pretrain.train.epochs,
               "output_dir": str(pretrain_dir(self.root, seed, SUPERVISED)), "resume": "auto"}
        return config, [*self.data_args, *overrides({**settings, **model, **run})], where

    def supervised_arms(self, seed: int, epochs: int) -> list[Arm]:
        """The supervised reference and its frozen evaluations; none with supervised.enabled=false."""
        if not self.cfg.supervised.enabled:
            return []
        config, args, _ = self._supervised_args(seed, epochs)
        return [Arm(arm_id(seed, "finetune", SUPERVISED), "finetune", ["--config", config, *args]),
                *self.eval_arms(seed, SUPERVISED, ["--checkpoint", str(pretrain_dir(self.root, seed, SUPERVISED))])]

    def pretrain_arms(self, seed: int, epochs: int) -> list[Arm]:
        arms = []
        for name, spec in self.cfg.pretrain.arms.items():
            config, args, _ = self._pretrain_args(name, spec, seed, epochs)
            arms.append(Arm(arm_id(seed, "pretrain", name), "pretrain", ["--config", config, *args]))
            arms += self.eval_arms(seed, name, ["--checkpoint", str(pretrain_dir(self.root, seed, name))],
                                   kinds=self.frozen_kinds)
        return arms

    @property
    def frozen_kinds(self) -> tuple[str, ...]:
        """The evaluations of a pretraining arm and of the random floor: eval.localise too when the data has boxes."""
        return ("knn", "linear", "localise") if self.data.boxes else ("knn", "linear")

    def eval_arms(self, seed: int, name: str, source: list[str], kinds: Sequence[str] = ("knn", "linear"),
                  extra: Sequence[str] = ()) -> list[Arm]:
        e = self.cfg.evaluate
        common = [*source, "--dataset", self.cfg.dataset, *self.data_args, f"seed={seed}",
                  f"output_dir={eval_dir(self.root, seed, name)}", *extra]
        # a pretraining arm's kNN also runs on the validation split: the fine-tuning init is chosen there
        per_kind = {"knn": [*e.knn, *(["knn.val=true"] if name in self.cfg.pretrain.arms else [])],
                    "linear": e.linear, "localise": []}
        return [Arm(arm_id(seed, kind, name), kind, [*common, *per_kind[kind]]) for kind in kinds
                if kind != "linear" or e.run_linear]

    def floor_arms(self, seed: int) -> list[Arm]:
        """Random init of the first arm's architecture; raw pixels (no network), at every image size."""
        first = str(pretrain_dir(self.root, seed, next(iter(self.cfg.pretrain.arms))))
        arms = self.eval_arms(seed, "random", ["--random-init", "--checkpoint", first], kinds=self.frozen_kinds) \
            if self.cfg.evaluate.random_floor else []
        # no feature cache: reading the images again is cheap, and 84 px pixels of the cluttered splits take 1.8 GB
        return arms + self.eval_arms(seed, "pixels", [], extra=["features.kind=pixels", "features.cache=false",
                                                                "knn.figures=false"])

    def best_pretrain_arm(self) -> str:
        """The pretraining arm the fine-tuning arms start from: the best mean kNN k20 top-1 on validation."""
        best = best_pretrain_arm(self.root, self.cfg.seeds, list(self.cfg.pretrain.arms))
        if best is None:
            raise ConfigError(f"evaluate.knn: no pretraining arm has {VAL_KNN_KEY} to choose the fine-tuning init "
                              "by; keep 20 in knn.ks")
        return best

    def finetune_arms(self, seed: int, best: str) -> list[Arm]:
        arms = []
        for name, spec in self.cfg.finetune.arms.items():
            init = split_spec(name, spec, "finetune")[0].get("init", "best")
            source = "" if init == "scratch" else str(pretrain_dir(self.root, seed, best if init == "best" else init))
            config, args, _ = self._finetune_args(name, spec, seed, source)
            arms.append(Arm(arm_id(seed, "finetune", name), "finetune", ["--config", config, *args]))
        return arms

    # ---- running -----------------------------------------------------------------------------

    def run(self) -> Path:
        check_output_dir(self.root, reads=[self.data.root])
        ensure_writable(self.root)
        if is_main_process():
            claim_run_dir(self.root, "study")
            save_config(self.cfg, self.root / STUDY_FILE)
            if not (self.root / "machine.json").is_file():
                write_json(self.root / "machine.json", machine())
        epochs = self.pretrain_epochs()
        for seed in self.cfg.seeds:
            for arm in self.pretrain_arms(seed, epochs) + self.floor_arms(seed) + self.supervised_arms(seed, epochs):
                self.run_arm(arm)
        if self.cfg.finetune.arms:
            best = self.best_pretrain_arm()
            log.info("fine-tuning from the best pretraining arm: %s", best)
            for seed in self.cfg.seeds:
                for arm in self.finetune_arms(seed, best):
                    self.run_arm(arm)
        report = build_report(self.root) if is_main_process() else self.root / "report"
        release_run_dir(self.root)
        return report

    def run_arm(self, arm: Arm) -> None:
        done = done_path(self.root, arm.id)
        if done.is_file():
            check_same_command(arm, done)
            if arm.result is None or arm.result.is_file():
                log.info("study: %s finished earlier, skipped", arm.id)
                return
            log.warning("study: %s finished earlier, but its result %s is gone (deleted or moved): running it again",
                        arm.id, arm.result)
        log.info("study: %s: %s", arm.id, arm.command)
        tic = time.perf_counter()
        try:
            ENTRY_POINTS[arm.kind][1](arm.argv)
        except USER_ERRORS as e:
            raise type(e)(f"study arm {arm.id}: {e}") from e
        except Interrupted as e:  # its checkpoint is written; the study's own command continues it (resume=auto)
            raise Interrupted(e.signum, e.step, e.checkpoint, "", e.is_main, f"study arm {arm.id}: ") from None
        if is_main_process():
            write_json(done, {"id": arm.id, "command": arm.command, "seconds": round(time.perf_counter() - tic, 1)})

    def pretrain_epochs(self) -> int:
        """The budget in epochs: `pretrain.epochs`, or what fits `pretrain.minutes`, timed once on the
        first seed and kept in budget.json so that a continued study gives every arm the same."""
        p = self.cfg.pretrain
        if p.minutes <= 0:
            return p.epochs
        budget_file = self.root / "budget.json"
        if (stored := read_json(budget_file)) is not None:
            return int(stored["epochs"])
        seconds_per_step = {}
        for name, spec in p.arms.items():
            config, args, _ = self._pretrain_args(name, spec, self.cfg.seeds[0], epochs=0)
            args += [f"output_dir={self.root / 'calibration' / name}", f"train.max_steps={CALIBRATION_STEPS}",
                     "train.figure_samples=0", "train.knn_every=0"]
            self.run_arm(Arm(f"calibration.{name}", "pretrain", ["--config", config, *args]))
            summary = read_json(self.root / "calibration" / name / "summary.json")
            seconds_per_step[name] = summary["seconds"] / summary["step"]
        cfg = load_config(config, args, PretrainConfig)
        world = world_size()
        per_epoch = len(build_dataset(cfg.data, cfg.data.train_split)) // (cfg.train.batch_size * world)
        epochs = max(1, math.floor(p.minutes * 60 / (sum(seconds_per_step.values()) * max(per_epoch, 1))))
        if is_main_process():
            write_json(budget_file, {"epochs": epochs, "minutes": p.minutes, "steps_per_epoch": per_epoch,
                                     "seconds_per_step": seconds_per_step})
        log.info("budget: %.1f minutes per seed → %d epochs for every pretraining arm", p.minutes, epochs)
        return epochs


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpu": gpu, "processes": world_size(), "python": platform.python_version(),
            "torch": torch.__version__}


def main(argv: Sequence[str] | None = None) -> None:
    report = Study(load_config(*parse_cli(argv, __doc__, StudyConfig), StudyConfig)).run()
    if is_main_process():
        print(f"report: {report / 'report.md'}")

