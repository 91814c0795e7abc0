"""Atomic checkpoints: accelerator.save_state into a temporary folder, then one rename.

A crash mid-save leaves only a `.tmp-*` folder behind; every `step_*` folder is complete. The
loop's own state (the global step) is JSON beside accelerate's files, not a pickle.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from accelerate import Accelerator

from sslfg.config import ConfigError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in folder.glob("step_*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """Saves model, optimizer, scaler and RNG states of every process; keeps the newest `keep`."""
    folder = Path(run_dir) / CHECKPOINTS
    final, tmp = folder / f"step_{step:08d}", folder / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """'' → None; 'auto' → the newest complete checkpoint of run_dir (None if there is none);
    otherwise a checkpoint folder that must exist."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume: '{resume}' is not a complete sslfg checkpoint (no {STATE_FILE} in it)")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restores every state saved by `save_checkpoint`; returns the global step it was taken at."""
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE_FILE).read_text())["step"])
