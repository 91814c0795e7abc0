"""Case 8, an output folder that cannot be written (a path through a regular file, or a full disk):
pretraining, fine-tuning and the frozen-feature evaluations stop at start-up with one error naming
the folder, before a dataset is read or a model built."""

from __future__ import annotations

import builtins
import errno
import importlib
import io
import json
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
        out = tmp_path / "file" / "run"
        said = f"output_dir: '{out}' is inside '{tmp_path / 'file'}', a file, not a folder"
    else:
        out = tmp_path / "disk" / "run"
        said = f"output_dir: cannot write to '{out}' (No space left on device)"
        fill_disk(monkeypatch, tmp_path / "disk")
    message = user_error(main, args(tiny_data, out), capsys)
    assert said in message, message
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


@pytest.mark.parametrize("target", ["weights", "csv", "image", "text", "folder", "checkpoint"])
def test_output_never_overwrites_a_file_it_did_not_write(target: str, tiny_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: `--output` replaced any file with the metrics JSON (a backbone, a dataset's csv or image, a
    checkpoint's state file) and exit 0; an existing folder was a traceback after the whole evaluation."""
    extract = Recorder(knn_transfer.split_features)
    monkeypatch.setattr(knn_transfer, "split_features", extract)
    main, args, _ = ENTRIES["eval.knn"]
    weights, ckpt = tmp_path / "run" / "backbone.safetensors", tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "train_state.json").write_text('{"step": 1}')
    weights.write_bytes(b"weights")
    path = {"weights": weights, "csv": tiny_data / "test.csv", "image": next((tiny_data / "images").rglob("*.png")),
            "text": tmp_path / "notes.json", "folder": tmp_path / "run", "checkpoint": ckpt / "knn.json"}[target]
    if target == "text":
        path.write_text('{"mine": 1}')
    before = {p: p.read_bytes() for p in (weights, tiny_data / "test.csv", path) if p.is_file()}
    message = user_error(main, [*args(tiny_data, tmp_path / "eval"), "--output", str(path)], capsys)
    assert message.startswith(f"output: '{path}'"), message
    expected = {"weights": "not a .json file name", "csv": "not a .json file name", "image": "not a .json file name",
                "text": "is not a metrics file of eval.knn", "folder": "is a folder",
                "checkpoint": "is inside the checkpoint folder"}[target]
    assert expected in message and extract.calls == 0
    assert {p: p.read_bytes() for p in before} == before and not (ckpt / "knn.json").exists()


def test_output_rewrites_its_own_metrics_file_and_makes_its_folder_only_when_writing(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main, args, _ = ENTRIES["eval.knn"]
    path = tmp_path / "results" / "new" / "knn.json"
    user_error(main, [*args(tiny_data, tmp_path / "bad"), "data.train_split=nope", "--output", str(path)], capsys)
    assert not (tmp_path / "results").exists()  # a command that fails at start-up leaves no folder
    first = main([*args(tiny_data, tmp_path / "eval"), "--output", str(path)])
    again = main([*args(tiny_data, tmp_path / "eval2"), "--output", str(path)])  # its own file: rewritten
    assert first["knn.k5.top1"] == again["knn.k5.top1"] and json.loads(path.read_text())["command"] == "knn"


def test_output_never_replaces_another_runs_result(tiny_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: `--output <a study arm's eval>/knn.json` replaced that arm's result with this evaluation's (both
    are metrics files of eval.knn) and exit 0; the study's report then read the wrong numbers."""
    main, args, _ = ENTRIES["eval.knn"]
    main(args(tiny_data, tmp_path / "arm" / "eval"))
    arm = tmp_path / "arm" / "eval"
    result, copy = arm / "knn.json", arm / "figures" / "copy.json"
    before = result.read_bytes()
    for path in (result, copy):  # its result, or a new file inside the arm's run folder
        message = user_error(main, [*args(tiny_data, tmp_path / "eval"), "--output", str(path)], capsys)
        assert message.startswith(f"output: '{path}' is inside '{arm}', the folder of another sslfg run"), message
    assert result.read_bytes() == before and not copy.exists()
    main([*args(tiny_data, tmp_path / "eval"), "--output", str(tmp_path / "eval" / "copy.json")])  # its own folder
