"""Atomic checkpoints: accelerator.save_state into a temporary folder, then one rename.

A crash mid-save leaves only a `.tmp-*` folder behind, which is never listed or resumed from and is
removed by the next successful save; every `step_*` folder is complete. The
loop's own state (the global step) is JSON beside accelerate's files, not a pickle.

Loading never runs code from a file: a checkpoint is verified file by file (`verify_checkpoint`)
before accelerate reads it, and weights files are read by timm with torch's weights-only unpickler.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from safetensors import safe_open

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
        for partial in folder.glob(".tmp-step_*"):  # left by a save that was killed, never a checkpoint
            shutil.rmtree(partial, ignore_errors=True)
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


def unsafe_load_reason(error: BaseException) -> str:
    """One line saying why torch's weights-only unpickler (or another reader) refused a file."""
    text, marker = str(error), "WeightsUnpickler error:"
    if marker in text:  # torch's message is a page of advice around this line
        text = text.split(marker, 1)[1].strip().split("\n\n")[0].split(" Please use")[0]
    return f"{type(error).__name__}: {' '.join(text.split())[:300]}"


def verify_checkpoint(path: Path) -> None:
    """ConfigError naming the first file of checkpoint `path` that is not plain data: JSON, safetensors,
    or a torch file that torch's weights-only unpickler accepts (with the numpy RNG types accelerate
    allows). A pickled object is refused, never executed. accelerate's load_state reads the same way
    but would fail with a traceback, or, for random_states_*.pkl, silently resume with fresh RNG."""
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as f:  # the header: names, shapes, offsets
                    f.keys()
            else:  # mmap: checks the pickle without reading the tensors (accelerate writes zip files)
                accelerate_load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # whatever the reader raised, the file is refused
            raise ConfigError(
                f"checkpoint file {file} is refused: it is not plain data that loads without running pickled code "
                f"({unsafe_load_reason(e)}); resume from another checkpoint"
            ) from e


def load_checkpoint(accelerator: Accelerator, path: Path) -> int:
    """Restores every state saved by `save_checkpoint`, after `verify_checkpoint`; returns the global
    step it was taken at."""
    verify_checkpoint(path)
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE_FILE).read_text())["step"])
