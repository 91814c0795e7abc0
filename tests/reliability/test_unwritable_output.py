"""Case 8, an output folder that cannot be written (a path through a regular file, or a full disk):
pretraining, fine-tuning and the frozen-feature evaluations stop at start-up with one error naming
the folder, before a dataset is read or a model built."""

from __future__ import annotations

import builtins
import errno
import importlib
import io
import os
from pathlib import Path

import pytest

from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn
from sslfg.commands import pretrain as train_ssl
from sslfg.evaluation import knn_transfer
from tests.reliability.outcomes import Recorder, user_error
from tests.reliability.procs import finetune_args, pretrain_args
from tests.test_eval_knn import TINY, data_args


class FullDiskFile:
    """A file opened for writing on a full disk: it opens, but nothing can be written to it."""

    def __init__(self, file: io.IOBase) -> None:
        self.file = file

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> FullDiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self.file, name)


def fill_disk(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Writes to files under `folder` fail with ENOSPC, as on a full file system (without privileges
    to mount a small one)."""
    real_open = io.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        inside = isinstance(file, str | os.PathLike) and Path(os.path.abspath(file)).is_relative_to(folder)
        return FullDiskFile(handle) if writing and inside else handle

    monkeypatch.setattr(io, "open", open_on_full_disk)
    monkeypatch.setattr(builtins, "open", open_on_full_disk)


# what a run must not have reached: (module, name) of the functions that read data and build the model
ENTRIES = {
    "pretrain": (train_ssl.main, lambda data, out: pretrain_args(data, out),
                 [("sslfg.pretrain", "build_dataset"), ("sslfg.pretrain", "build_method")]),
    "finetune": (finetune_cli.main, lambda data, out: finetune_args(data, out),
                 [("sslfg.finetune", "build_dataset"), ("sslfg.finetune", "build_classifier")]),
    "eval.knn": (knn.main, lambda data, out: ["--random-init", "--model", "vit_tiny_patch16_224", *TINY,
                                              *data_args(data), f"output_dir={out}"],
                 [("sslfg.evaluation.run", "build_dataset"), ("sslfg.evaluation.run", "create_backbone")]),
}


@pytest.mark.parametrize("problem", ["parent is a file", "disk full"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_unwritable_output_dir_stops_before_any_work(tiny_data: Path, tmp_path: Path, entry: str, problem: str,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    main, args, never = ENTRIES[entry]
    recorders = {}
    for module, name in never:
        recorders[name] = Recorder(getattr(importlib.import_module(module), name))
        monkeypatch.setattr(f"{module}.{name}", recorders[name])
    if problem == "parent is a file":
        (tmp_path / "file").write_text("")
        out, reason = tmp_path / "file" / "run", "Not a directory"
    else:
        out, reason = tmp_path / "disk" / "run", "No space left on device"
        fill_disk(monkeypatch, tmp_path / "disk")
    message = user_error(main, args(tiny_data, out), capsys)
    assert f"output_dir: cannot write to '{out}' ({reason})" in message
    assert {name: r.calls for name, r in recorders.items()} == {name: 0 for name in recorders}
    assert not (out / "checkpoints").exists() and not list(out.glob(".write-test-*"))


def test_unwritable_output_file_of_an_evaluation(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    extract = Recorder(knn_transfer.split_features)
    monkeypatch.setattr(knn_transfer, "split_features", extract)
    (tmp_path / "file").write_text("")
    main, args, _ = ENTRIES["eval.knn"]
    message = user_error(main, [*args(tiny_data, tmp_path / "eval"), "--output", str(tmp_path / "file" / "m.json")],
                         capsys)
    assert f"output: cannot write to '{tmp_path / 'file'}'" in message and extract.calls == 0
