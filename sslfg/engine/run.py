"""One training run's set-up, the same for pretraining, fine-tuning and the full linear probe: the run directory
and the checkpoint it resumes from, config.yaml, the seed, the seeded training loader, the prepared model and
optimizer with that checkpoint's state, the metrics log and the loop. Each command adds only what is its own:
datasets, model, schedules, loss, and what it writes at the end.

    run = open_run(cfg, cfg.output_dir, cfg.resume, make_accelerator(...))
    sampler, loader = run.loader(dataset, batch_size)
    model, optimizer = run.start(model, optimizer)
    metrics = run.metrics()
    step = run.train(model, optimizer, loader, sampler, loop, run.loop_state(schedules), metrics, loss)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from sslfg.config import ConfigError, load_config, save_config
from sslfg.data.loader import EpochBatchSampler, seeded_loader
from sslfg.engine.checkpoint import checkpoint_progress, load_checkpoint, resolve_resume
from sslfg.engine.loop import LoopState, run_loop
from sslfg.engine.metrics import MetricsLog, flat_config
from sslfg.engine.rundir import RUN_CONFIG, data_roots, prepare_run_dir, release_run_dir
from sslfg.schema import LoopConfig

log = logging.getLogger(__name__)
# What a resumed run must share with the run that saved the checkpoint: the network its state is loaded into as
# saved (the image size: the position embedding), for an evaluation's run (the full linear probe) the backbone it
# reads, and what decides the remaining steps (data order and augmentation draws, batch, optimiser, warm-up), so
# that the run continues as if never stopped. Free to change: the lr and the precision (a non-finite loss's remedy:
# resume with a lower one), the epochs (extend a finished run), logging and checkpoint intervals, workers, the
# data's folder.
RESUME_KEYS = ("model", "model_kwargs", "method", "data.image_size", "checkpoint", "random_init", "pretrained",
                "features.kind", "init", "seed", "augment", "data.format", "data.train_split", "data.mean", "data.std",
                "data.labels", "train.batch_size", "train.grad_accum_steps", "train.warmup_epochs",
                "train.warmup_steps", "train.weight_decay", "train.weight_decay_end", "train.betas",
                "train.sgd_momentum", "train.nesterov", "train.clip_grad", "train.clip_mode")
PATH_KEYS = ("checkpoint", "init")  # the RESUME_KEYS that name a file (or a run folder)


@dataclass
class Run:
    """Where a run writes and what it continues from; `start` sets `start_step`."""

    accelerator: Accelerator
    run_dir: Path
    resume_from: Path | None  # the checkpoint to continue from (with `check`: it would); None: a fresh run
    seed: int
    num_workers: int  # of the training loader
    resume_key: str = "resume"  # the key that continues this run, as errors name it
    config: Any = None  # written to config.yaml once the checkpoint is loaded (None: not written)
    start_step: int = 0

    def loader(self, dataset: Dataset, batch_size: int, grad_accum_steps: int = 1) -> tuple[EpochBatchSampler,
                                                                                            DataLoader]:
        """This process's seeded batches of `dataset` (`sslfg.data.loader`), every epoch ending on an optimizer step."""
        a = self.accelerator
        sampler = EpochBatchSampler(len(dataset), batch_size, a.process_index, a.num_processes, self.seed,
                                    multiple_of=grad_accum_steps)
        return sampler, seeded_loader(dataset, sampler, self.num_workers, pin_memory=a.device.type == "cuda")

    def start(self, model: nn.Module, optimizer: Optimizer, resuming: str = "resuming") -> tuple[nn.Module, Optimizer]:
        """The prepared model and optimizer, with the state of `resume_from` when there is one (`start_step`
        becomes its step, and the log says `resuming` from where); then config.yaml is written: a resume that
        fails leaves the run folder as it was."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.resume_from:
            self.start_step = load_checkpoint(self.accelerator, self.resume_from, self.resume_key)
            log.info("%s from %s (step %d)", resuming, self.resume_from, self.start_step)
        if self.config is not None and self.accelerator.is_main_process:
            save_config(self.config, self.run_dir / RUN_CONFIG)
        return model, optimizer

    def loop_state(self, schedules: dict[str, Any], **keys: Any) -> LoopState:
        """The loop's state at `start_step`: a resumed run goes on counting its checkpoint's training seconds and
        images (unknown, None, when that checkpoint kept none). `keys`: LoopState's other fields (lr_key)."""
        progress = checkpoint_progress(self.resume_from) if self.resume_from else {"seconds": 0.0, "images_seen": 0}
        return LoopState(schedules, self.start_step, resume_key=self.resume_key, seconds=progress.get("seconds"),
                         images_seen=int(progress.get("images_seen", 0)), **keys)

    def metrics(self, trackers: Sequence[str] = ("tensorboard",), config: Any = None) -> MetricsLog:
        """The run's metrics log, cut back to `start_step` when resuming (`MetricsLog`)."""
        return MetricsLog(self.run_dir, self.accelerator.is_main_process,
                          resume_step=self.start_step if self.resume_from else None, trackers=trackers, config=config)

    def train(self, model: nn.Module, optimizer: Optimizer, loader: DataLoader, sampler: EpochBatchSampler,
              loop: LoopConfig, state: LoopState, metrics: MetricsLog,
              compute_loss: Callable[[Any], dict[str, Tensor]], **hooks: Callable[..., None]) -> int:
        """`run_loop` (its `hooks`: before_step, after_update, evaluate), then closes `metrics`; the last step."""
        step = run_loop(self.accelerator, model, optimizer, loader, sampler, loop, state, self.run_dir, metrics,
                        compute_loss, **hooks)
        metrics.close()
        return step

    def close(self) -> None:
        """The run is over: another run (in this process too) may claim its folder."""
        release_run_dir(self.run_dir)


def open_run(cfg: Any, output_dir: str | Path, resume: str, accelerator: Accelerator, check: bool = False,
             resume_key: str = "resume", write_config: bool = True, kind: str = "pretrain") -> Run:
    """Checks, creates and claims the run directory for a command of `kind` (`prepare_run_dir`), finds the
    checkpoint `resume` names ('' | 'auto' | a path) and checks that it was trained with `cfg`'s architecture,
    and seeds every RNG with `cfg.seed`; `Run.start` writes `cfg` to config.yaml (main process, with
    `write_config`). With `check` nothing is written. `cfg` has `seed` and `data`."""
    resume_from = check_run(cfg, output_dir, resume, resume_key, kind, accelerator.is_main_process)
    if not check:
        prepare_run_dir(str(output_dir), resume, resume_key, kind, accelerator.is_main_process, data_roots(cfg))
    set_seed(cfg.seed)
    return Run(accelerator, Path(output_dir), resume_from, cfg.seed, cfg.data.num_workers, resume_key,
               cfg if write_config and not check else None)


def check_run(cfg: Any, output_dir: str | Path, resume: str, resume_key: str = "resume", kind: str = "pretrain",
              main: bool = True) -> Path | None:
    """What `open_run` would refuse, read only: the run folder (`prepare_run_dir`), the checkpoint `resume` names
    and a change of architecture; returns that checkpoint. All of it is --check's, and it comes before the run
    creates anything, so that --check fails with the run's own message."""
    run_dir = prepare_run_dir(str(output_dir), resume, resume_key, kind, main, data_roots(cfg), check=True)
    resume_from = resolve_resume(resume, run_dir, resume_key)
    if resume_from is not None:
        check_same_architecture(cfg, resume_from, resume_key)
    return resume_from


def check_same_architecture(cfg: Any, checkpoint: Path, resume_key: str) -> None:
    """ConfigError when `cfg` differs from the config.yaml of the run that wrote `checkpoint` in a key of
    `RESUME_KEYS` (naming each key, old → new), or when that run has no config.yaml and `cfg` names no data."""
    run_config = checkpoint.parent.parent / RUN_CONFIG
    if not run_config.is_file():
        if not cfg.data.root:
            raise ConfigError(f"{resume_key}: the run folder {checkpoint.parent.parent} has checkpoints but no "
                              f"{RUN_CONFIG}, so its settings are unknown; give the recipe it was started with "
                              f"(--config RECIPE {resume_key}=auto)")
        return
    try:
        saved = load_config(run_config, [], type(cfg))
    except ConfigError as e:  # another kind of run's checkpoint (a fine-tune's given to pretraining), or damaged
        raise ConfigError(f"{resume_key}: {checkpoint} cannot be continued by this command: its run's settings "
                          f"({run_config}) are not this command's kind ({e}); give a checkpoint of a run this "
                          "command started (pretraining: train_ssl.py, fine-tuning: eval.finetune)") from None
    old, new = flat_config(saved), flat_config(cfg)

    def same(key: str) -> bool:  # a backbone file is the same however its path is spelt (relative, absolute)
        a, b = old.get(key), new.get(key)
        return a == b or (key in PATH_KEYS and bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b))

    changed = [f"{k}: {old.get(k)} → {new.get(k)}" for k in sorted(old.keys() | new.keys())
               if any(k == a or k.startswith(f"{a}.") for a in RESUME_KEYS) and not same(k)]
    if changed:
        raise ConfigError(f"{resume_key}: {checkpoint} was trained with other settings ({run_config}) than this "
                          f"command's: {'; '.join(changed)}; drop those overrides to continue the run, or start a "
                          f"new run in another output_dir")
