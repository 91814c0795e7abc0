"""The run directory: created and checked before any training time is spent."""

from __future__ import annotations

import os
from pathlib import Path

from sslfg.config import ConfigError
from sslfg.engine.checkpoint import checkpoint_dirs


def prepare_run_dir(output_dir: str, resume: str, resume_key: str = "resume") -> Path:
    """Creates `output_dir`, proves it writable, and refuses to start a fresh run on top of an
    existing run's checkpoints (which would be lost). Every process calls it, so an error
    stops all of them, not only the main one."""
    run_dir = ensure_writable(output_dir)
    if not resume and checkpoint_dirs(run_dir):
        raise ConfigError(
            f"output_dir: '{run_dir}' already holds checkpoints; continue that run with `{resume_key}=auto` "
            f"or choose another output_dir"
        )
    return run_dir


def ensure_writable(folder: str | Path, key: str = "output_dir") -> Path:
    """Creates `folder` and proves a file can be written in it (a full disk, a read-only mount or a
    path through a file fail here, not hours later); ConfigError naming `key` and the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"0" * 4096)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to '{folder}' ({e.strerror or e}); choose another {key}") from e
    return folder

