"""The run directory: checked, claimed and proven writable before any training time is spent.

A run folder belongs to one kind of command (pretrain, finetune, eval, ...) and to one run at a time: its
lock file records the kind and the owner (pid, command line) and is held with `fcntl.flock` while the
run lives, so a run killed by any signal leaves no stale lock (the kernel drops it with the process).
Only the main process claims; the launcher ends the others when it stops with the error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sslfg.config import ConfigError
from sslfg.engine.checkpoint import STATE_FILE, checkpoint_dirs

LOCK_FILE = ".sslfg-run.lock"
WRITE_PROBE = ".write-test-"  # `ensure_writable`'s file, which another process may hold in the folder for a moment
RUN_CONFIG = "config.yaml"  # a run's settings, as `save_config` writes them
RUN_FILES = (RUN_CONFIG, "summary.json", "metrics.jsonl", "metrics.json")  # what a run would overwrite
_held: dict[Path, int] = {}  # folder -> lock file descriptor, for the folders this process owns
_created: set[Path] = set()  # the folders `ensure_writable` created in this process


def read_run_file(path: Path, fix: str, needs: Sequence[str] = ()) -> dict[str, Any]:
    """The mapping a run's own JSON or YAML file holds (config.yaml, backbone.json, summary.json: by its suffix), with
    the keys `needs`; one ConfigError naming the file, what is wrong with it and `fix` when it is unreadable,
    damaged (cut short, edited) or lacks one of them, where the readers would raise a parser's traceback."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        problem = "" if isinstance(data, dict) else f"it holds {type(data).__name__}, not a mapping"
    except (OSError, ValueError, yaml.YAMLError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        problem = str(e).splitlines()[0]
    missing = [k for k in needs if k not in data] if not problem else []
    if problem or missing:
        problem = problem or f"no {', '.join(repr(k) for k in missing)}"
        raise ConfigError(f"{path}: this file of an sslfg run cannot be read ({problem}): it was cut short or edited; "
                          f"{fix}")
    return data


def prepare_run_dir(output_dir: str, resume: str, resume_key: str = "resume", kind: str = "pretrain",
                    main: bool = True, reads: Sequence[str] = (), check: bool = False) -> Path:
    """Checks `output_dir` (`check_output_dir`: outside the dataset folders `reads`), creates it, proves it
    writable, claims it for a run of `kind` (main process) and refuses to start a fresh run on top of an
    existing run's checkpoints (which would be lost). Every process calls it, so an error stops all of them,
    not only the main one. With `check` (--check) it refuses the same and creates nothing."""
    check_output_dir(output_dir, reads=reads)
    run_dir = Path(output_dir) if check else ensure_writable(output_dir)
    has_checkpoints = bool(checkpoint_dirs(run_dir))
    if main:  # a run of ours from before the lock file existed is known by its checkpoints
        claim_run_dir(run_dir, kind, ours=bool(resume) and has_checkpoints, check=check)
    if not resume and has_checkpoints:
        raise ConfigError(
            f"output_dir: '{run_dir}' already holds checkpoints; continue that run with `{resume_key}=auto` "
            f"or choose another output_dir"
        )
    return run_dir


def check_output_dir(output_dir: str | Path, key: str = "output_dir", reads: Sequence[str] = (),
                     example: str = "", shared: bool = False) -> None:
    """ConfigError for an output folder a run must not fill: empty (an unset shell variable), the current
    folder, the code's folder or one above them, where the run's files would land among others, or a dataset
    folder the command reads (`reads`, see `data_roots`) or one inside it, where a folder layout would read
    the run's figures as images the next time, a checkpoint folder or one inside it, or a path starting with
    '~', which no shell expanded (it would be a folder named '~'). The message ends with
    `example` (default `<key>=runs/my_run`). `shared`: the folder of one file, which may lie among others."""
    example = example or f"{key}=runs/my_run"
    if not str(output_dir).strip():
        raise ConfigError(f"{key} is empty (an unset shell variable?); name the run's own folder, e.g. {example}")
    if str(output_dir).startswith("~"):  # a shell expands ~ only at the start of a word, not after key=
        home = f"{key}{' ' if key.startswith('-') else '='}$HOME{str(output_dir)[1:]}"
        raise ConfigError(f"{key}: '{output_dir}' starts with '~', which is not your home folder here (a shell expands "
                          f"it only at the start of a word, not after '=' or in quotes) but a folder named '~'; "
                          f"write the path out, e.g. {home}")
    folder, here, code = Path(output_dir).resolve(), Path.cwd().resolve(), Path(__file__).resolve().parents[2]
    existing = next((f for f in (folder, *folder.parents) if f.exists()), folder)
    if not shared and not existing.is_dir():  # --check passed it and the run then could not write
        what = "is a file" if existing == folder else f"is inside '{existing}', a file"
        raise ConfigError(f"{key}: '{output_dir}' {what}, not a folder; name a folder, e.g. {example}")
    if not shared and folder in (here, *here.parents, code, *code.parents):
        raise ConfigError(f"{key}: '{output_dir}' is {folder}, the current folder, the code's folder or one above "
                          f"them, where the run would mix its files with others; name a folder of its own, e.g. "
                          f"{example}")
    inside = next((f for f in (folder, *folder.parents) if (f / STATE_FILE).is_file()), None)
    if inside is not None:  # resume reads that folder: it holds the checkpoint's files and nothing else
        raise ConfigError(f"{key}: '{output_dir}' is inside the checkpoint folder '{inside}', which holds a "
                          f"checkpoint's files and nothing else; name a folder outside it, e.g. {example}")
    for root in filter(None, reads):
        if Path(root).resolve() in (folder, *folder.parents):
            raise ConfigError(f"{key}: '{output_dir}' is inside the dataset folder '{root}' that this command reads; "
                              f"its files would mix with the data (a folder layout would read its figures as "
                              f"images next time): name a folder outside it, e.g. {example}")


def data_roots(cfg: Any) -> list[str]:
    """The dataset folders a command with config `cfg` reads: `data.root` and, when set, `eval_data.root`."""
    return [section.root for name in ("data", "eval_data") if (section := getattr(cfg, name, None)) is not None]


def claim_run_dir(folder: Path, kind: str, key: str = "output_dir", ours: bool = False, check: bool = False) -> None:
    """Makes this process the owner of `folder` for a command of `kind`, or raises ConfigError: when another
    run holds it (naming its pid and command line), when another kind of command wrote it, or when it
    holds anything but no lock file (not a run's folder; `ours`: known to be one, from before lock files),
    in which case nothing is created. With `check` it raises the same without locking."""
    folder = Path(folder).resolve()
    if folder in _held:
        return
    lock = folder / LOCK_FILE
    written = [str(folder / name) for name in RUN_FILES if (folder / name).exists()]
    present = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE and not p.name.startswith(WRITE_PROBE)) \
        if folder.is_dir() else []
    if present and not ours and not lock.exists():  # not a run's folder: its files are someone else's
        first = written[0] if written else str(folder / present[0])
        more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
        raise ConfigError(f"{key}: '{folder}' holds {first}{more}, which no sslfg run wrote (no {LOCK_FILE}), and "
                          f"a run writes only into a new or empty folder or one of its own; choose another {key} "
                          "or move the files away")
    if check:
        if lock.is_file():
            owner = _owner_of(lock, key)
            _same_kind(owner, folder, kind, key, [*written, str(lock)])
            if _lock_holder(lock) is not None:
                raise in_use(folder, key, owner)
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise unwritable(folder, key, e) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use(folder, key, _owner(fd)) from None
        _same_kind(_owner(fd), folder, kind, key, [*written, str(lock)])
        record = json.dumps({"kind": kind, "pid": os.getpid(), "command": shlex.join(sys.argv)}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise unwritable(folder, key, e) from e
        raise
    _held[folder] = fd


def release_run_dirs() -> None:
    """Ends this process's ownership of every folder it claimed (a command ended, also by an error)."""
    for folder in list(_held):
        release_run_dir(folder)


def release_run_dir(folder: Path) -> None:
    """Ends this process's ownership of `folder` (a finished run; the next one in this process may claim it)."""
    folder = Path(folder).resolve()
    fd = _held.pop(folder, None)
    if fd is None:
        return
    # A run that ended before writing anything (an error at start-up) leaves the folder as it found it: the lock
    # file goes while still held (a run opening it meanwhile is refused, not handed an unlinked file), and the
    # folder too when this process created it.
    try:
        left_empty = [e.name for e in os.scandir(folder)] == [LOCK_FILE]
        if left_empty:
            (folder / LOCK_FILE).unlink()
    except OSError:  # the folder or its lock was removed under the run
        left_empty = False
    os.close(fd)  # closing the descriptor drops the flock
    if left_empty and folder in _created:
        _created.discard(folder)
        with contextlib.suppress(OSError):  # another process wrote into it meanwhile: it is theirs now
            folder.rmdir()


def _same_kind(owner: dict, folder: Path, kind: str, key: str, files: list[str]) -> None:
    """ConfigError when the lock file's `owner` record is of another kind of command than `kind`."""
    if owner.get("kind", kind) != kind:
        raise ConfigError(f"{key}: '{folder}' holds a {owner['kind']} run ({', '.join(files)}) and a {kind} run would "
                          f"write beside its files; choose another {key}")


def in_use(folder: Path, key: str, owner: dict) -> ConfigError:
    return ConfigError(f"{key}: '{folder}' is in use by another run (pid {owner.get('pid', '?')}: "
                       f"{owner.get('command', '?')}); wait for it to end or choose another {key}")


def _lock_holder(lock: Path) -> int | None:
    """The pid holding `lock`'s flock, read from Linux's /proc/locks without taking it (a lock taken to look
    would refuse a run starting meanwhile); None when free or where there is no /proc/locks."""
    try:
        st, table = lock.stat(), Path("/proc/locks").read_text()
    except OSError:
        return None
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
            return int(fields[4])
    return None


def _owner_of(lock: Path, key: str) -> dict:
    """The record of lock file `lock`, read without locking it."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError as e:
        raise unwritable(lock.parent, key, e) from e
    try:
        return _owner(fd)
    finally:
        os.close(fd)


def _owner(fd: int) -> dict:
    """The kind and owner recorded in a lock file ({} for a new or unreadable one)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def ensure_writable(folder: str | Path, key: str = "output_dir", create: bool = True) -> Path:
    """Creates `folder` and proves a file can be written in it (a full disk, a read-only mount or a
    path through a file fail here, not hours later); ConfigError naming `key` and the folder. Without
    `create`, nothing is made: the proof is written in its nearest existing folder."""
    folder = Path(folder)
    try:
        if create and not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            _created.add(folder.resolve())
        where = next(f for f in (folder, *folder.parents) if f.exists())
        probe = where / f"{WRITE_PROBE}{os.getpid()}"
        try:
            probe.write_bytes(b"0" * 4096)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise unwritable(folder, key, e) from e
    return folder


def unwritable(folder: Path, key: str, error: OSError) -> ConfigError:
    return ConfigError(f"{key}: cannot write to '{folder}' ({error.strerror or error}); choose another {key}")
