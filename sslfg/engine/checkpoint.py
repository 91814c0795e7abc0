"""Atomic checkpoints: accelerator.save_state into a temporary folder, then one rename.

A crash mid-save leaves only a `.tmp-*` folder behind, which is never listed or resumed from and is
removed by the next successful save; every `step_*` folder is complete. The
loop's own state (the global step) is JSON beside accelerate's files, not a pickle.

Loading never runs code from a file, nor resumes from a checkpoint that lost a file (its state file lists
them, with their sizes): a checkpoint is verified file by file (`missing_file`, `unreadable_file`) before
accelerate reads it, and weights files are read by timm with torch's weights-only unpickler.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
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
PROGRESS = ("seconds", "images_seen")  # LoopState's fields a checkpoint keeps
LEGACY_FILES = ("model.safetensors", "optimizer.bin")  # in every checkpoint written before its files were listed
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "a file reached the file-size limit"}
FULL_DISK_BYTES = 1 << 20  # a failed write with less free space than this blames the disk


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space, a quota, the file-size limit); no complete one was lost."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in folder.glob("step_*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int, resume_key: str = "resume",
                    progress: dict[str, float] | None = None) -> Path:
    """Saves model, optimizer, scaler and RNG states of every process; keeps the newest `keep`. Its state
    file lists every file with its size, so a file lost or cut short later is found on resume, and holds
    `progress` (the loop's training seconds and images so far: a resumed run's summary counts the whole run).
    A write that fails for want of space (or the file-size limit) is a CheckpointWriteError naming
    `resume_key`; the partial folder is removed."""
    folder = Path(run_dir) / CHECKPOINTS
    final, tmp = folder / f"step_{step:08d}", folder / f".tmp-step_{step:08d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(progress or {}), "files": files}))
    except Exception as e:  # whatever the writer raised (safetensors and torch wrap the OSError)
        problem = storage_problem(e, folder)
        if not problem:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        newest = checkpoint_dirs(run_dir)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: {problem}; nothing was lost: the newest complete checkpoint is "
            f"{newest[-1] if newest else 'none (the run had written none yet)'}; free space (or raise the limit) "
            f"and continue with {resume_key}=auto") from e
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        for partial in folder.glob(".tmp-step_*"):  # left by a save that was killed, never a checkpoint
            shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def storage_problem(error: BaseException, folder: Path) -> str:
    """What the storage did when writing into `folder` failed with `error` ('' when it was not the storage):
    no space left, a disk quota, or the file-size limit (`ulimit -f`: Python ignores SIGXFSZ, so the write
    fails with EFBIG, which safetensors and torch wrap in their own errors)."""
    text = f"{error} {error.__context__ or ''}"
    what = next((what for code, what in STORAGE_ERRNOS.items()
                 if getattr(error, "errno", None) == code or os.strerror(code) in text), "")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and what in ("", STORAGE_ERRNOS[errno.EFBIG]):
        return f"a file reached the file-size limit of {limit} bytes (ulimit -f)"
    try:
        full = shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        full = False
    return what or (STORAGE_ERRNOS[errno.ENOSPC] if full else "")


def resolve_resume(resume: str, run_dir: Path, key: str = "resume") -> Path | None:
    """'' → None; 'auto' → the newest complete checkpoint of run_dir (None if there is none);
    otherwise a checkpoint folder that must exist (ConfigError naming `key`, the setting that gave `resume`)."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        what = "does not exist" if not path.exists() else f"is not a complete sslfg checkpoint (no {STATE_FILE} in it)"
        found = checkpoint_dirs(run_dir)
        raise ConfigError(f"{key}: '{resume}' {what}; give a checkpoint folder (<run>/{CHECKPOINTS}/step_*"
                          f"{f', e.g. {found[-1]}' if found else ''}), {key}=auto for the newest in {run_dir}, or "
                          f"leave {key} unset for a new run")
    return path


def missing_file(path: Path, processes: int = 1) -> str:
    """What checkpoint `path` lacks: a file its state file lists (or, for one written before the list was kept,
    the model or optimizer), one cut short, or the RNG state of one of `processes`; '' when complete."""
    try:
        files = json.loads((path / STATE_FILE).read_text()).get("files") or dict.fromkeys(LEGACY_FILES)
    except (OSError, ValueError, AttributeError):
        return f"checkpoint file {path / STATE_FILE} is unreadable"
    files = {f"random_states_{i}.pkl": None for i in range(processes)} | files
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"checkpoint {path} is incomplete: {name} is missing"
        if size is not None and file.stat().st_size != size:
            return f"checkpoint file {file} is truncated ({file.stat().st_size} of its {size} bytes)"
    return ""


def refuse_incomplete(path: Path, problem: str, key: str, processes: int = 1) -> None:
    """ConfigError saying `problem` of checkpoint `path` and naming the newest older checkpoint that is
    complete and how to continue from it (`key`=that folder)."""
    older = [p for p in checkpoint_dirs(path.parent.parent) if p.name < path.name and not missing_file(p, processes)]
    then = (f"the previous complete checkpoint is {older[-1]}: use it with {key}={older[-1]}" if older
            else "there is no earlier complete checkpoint: start afresh in another output_dir")
    raise ConfigError(f"{problem}; {then}")


def unsafe_load_reason(error: BaseException) -> str:
    """One line saying why torch's weights-only unpickler (or another reader) refused a file."""
    text, marker = str(error), "WeightsUnpickler error:"
    if marker in text:  # torch's message is a page of advice around this line
        text = text.split(marker, 1)[1].strip().split("\n\n")[0].split(" Please use")[0]
    return f"{type(error).__name__}: {' '.join(text.split())[:300]}"


def unreadable_file(path: Path) -> str:
    """Why the first file of checkpoint `path` that is not plain data is refused ('' when all are): JSON,
    safetensors, or a torch file that torch's weights-only unpickler accepts (with the numpy RNG types
    accelerate allows). A pickled object is refused, never executed; a file cut short is called so. Only the
    checkpoint's own files are read, those its state file lists (all at its top for one written before the list
    was kept): nothing else in the folder is loaded on resume, so nothing else is judged."""
    top = {p.name for p in Path(path).iterdir() if p.is_file()}
    try:
        listed = set(json.loads((Path(path) / STATE_FILE).read_text()).get("files") or top)
    except (OSError, ValueError, AttributeError):  # missing_file names the unreadable state file
        listed = top
    for file in sorted(Path(path) / name for name in listed & top):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(str(file), "pt") as f:  # the header: names, shapes, offsets
                    f.keys()
            else:  # mmap: checks the pickle without reading the tensors (accelerate writes zip files)
                accelerate_load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # whatever the reader raised, the file is refused
            if "WeightsUnpickler error" in str(e):
                return (f"checkpoint file {file} is refused: it is not plain data that loads without running pickled "
                        f"code ({unsafe_load_reason(e)})")
            return (f"checkpoint file {file} is refused: it is unreadable, truncated or damaged "
                    f"({unsafe_load_reason(e)})")
    return ""


def load_checkpoint(accelerator: Accelerator, path: Path, resume_key: str = "resume") -> int:
    """Restores every state saved by `save_checkpoint` once the checkpoint is complete (`missing_file`, an RNG
    state for every process) and plain data (`unreadable_file`); returns the global step it was taken at.
    A ConfigError names what is wrong and the previous complete checkpoint."""
    problem = unreadable_file(path) or missing_file(path, accelerator.num_processes)
    if problem:
        refuse_incomplete(path, problem, resume_key, accelerator.num_processes)
    accelerator.load_state(str(path))
    return int(json.loads((path / STATE_FILE).read_text())["step"])


def checkpoint_progress(path: Path) -> dict[str, float]:
    """The loop's progress saved with the checkpoint at `path` (`save_checkpoint`); {} when it holds none
    (saved before sslfg kept it)."""
    state = json.loads((Path(path) / STATE_FILE).read_text())
    return {k: state[k] for k in PROGRESS} if all(k in state for k in PROGRESS) else {}
