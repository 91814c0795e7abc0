"""Case 7, safe loading: nothing a user points sslfg at can run code, and nothing goes online.

(a) A weights file (`model.weights`, `init=`, `--checkpoint`) or a file of a run checkpoint (resume)
    holding a pickled object is refused with one clear error naming the file, and the object's code
    never runs: its payload would create a marker file, which must not exist afterwards.
(b) YAML is read with the safe loader: a `!!python/object/apply` tag is an error naming the file.
(c) Pretraining, kNN, the fast linear probe and fine-tuning open no network connection.
"""

from __future__ import annotations

import io
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

from sslfg.cli import run_cli
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn, linear
from sslfg.commands import pretrain as train_ssl
from tests.reliability.outcomes import user_error
from tests.reliability.procs import finetune_args, pretrain_args
from tests.test_eval_knn import TINY, data_args


class TouchOnLoad:
    """Unpickling this calls Path.touch(marker): what any code hidden in a pickle could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def malicious_file(path: Path, marker: Path) -> Path:
    """A state dict whose unpickling would create `marker`, written by pickle for a .bin file, else by
    torch.save (a zip). Checks that the payload is live: loading it the unsafe way creates the marker."""
    state = {"pos_embed": torch.zeros(1), "payload": TouchOnLoad(marker)}
    if path.suffix != ".bin":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.write_bytes(buffer.getvalue())
        torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # (torch.load(path) reads *.safetensors
    else:  # as safetensors)
        path.write_bytes(pickle.dumps(state))
        pickle.loads(path.read_bytes())
    assert marker.exists(), "the payload did not run when loaded unsafely"
    marker.unlink()
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("safe") / "run"
    assert run_cli(train_ssl.main, pretrain_args(tiny_data, run, **{"train.max_steps": 2})) == 0
    return run


def _weights_args(kind: str, data: Path, out: Path, weights: Path) -> tuple[object, list[str]]:
    if kind == "pretrain model.weights":
        return train_ssl.main, pretrain_args(data, out, **{"model.weights": weights})
    if kind == "finetune init":
        return finetune_cli.main, finetune_args(data, out, init=weights)
    return knn.main, ["--checkpoint", str(weights), "--model", "vit_tiny_patch16_224", *TINY, *data_args(data),
                      f"output_dir={out}"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, reading the raw pickle it refuses
@pytest.mark.parametrize("name", ["weights.pth", "weights.bin", "weights.safetensors"])  # zip, raw pickle, mislabelled
@pytest.mark.parametrize("kind", ["pretrain model.weights", "finetune init", "eval --checkpoint"])
def test_weights_file_with_a_pickled_object_is_refused(tiny_data: Path, tmp_path: Path, kind: str, name: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    weights = malicious_file(tmp_path / name, marker)
    main, argv = _weights_args(kind, tiny_data, tmp_path / "out", weights)
    message = user_error(main, argv, capsys)
    assert f"'{weights}' is refused: it is not a " in message
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "model.safetensors", "train_state.json"])
def test_run_checkpoint_with_a_pickled_object_is_refused(finished_run: Path, tmp_path: Path, name: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (ckpt,) = (run / "checkpoints").iterdir()
    marker = tmp_path / "pwned"
    malicious_file(ckpt / name, marker)
    argv = ["--config", str(run / "config.yaml"), f"output_dir={run}", "resume=auto", "train.max_steps=3"]
    message = user_error(train_ssl.main, argv, capsys)
    assert f"checkpoint file {ckpt / name} is refused" in message
    assert not marker.exists()
    assert not (ckpt.parent / "step_00000003").exists()  # nothing resumed


def test_an_intact_checkpoint_still_resumes(finished_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    argv = ["--config", str(run / "config.yaml"), f"output_dir={run}", "resume=auto", "train.max_steps=3"]
    assert run_cli(train_ssl.main, argv) == 0 and (run / "checkpoints" / "step_00000003").is_dir()


@pytest.mark.parametrize("where", ["file", "command line"])
def test_yaml_python_tags_are_refused(tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    tag = f"!!python/object/apply:os.system ['touch {marker}']"
    yaml.unsafe_load(tag)  # the payload is live: the unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"train:\n  epochs: {tag}\n")
    argv = ["--config", str(recipe)] if where == "file" else [f"train.epochs={tag}"]
    message = user_error(train_ssl.main, [*argv, f"output_dir={tmp_path / 'run'}"], capsys)
    assert (f"invalid YAML in {recipe}" if where == "file" else "train.epochs: cannot parse") in message
    assert "python/object/apply" in message
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_no_network_connection_is_attempted(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[str] = []

    def refuse(name: str):
        def blocked(*args, **kwargs):
            attempts.append(f"{name}{args[1:] if name.startswith('socket.') else args}")
            raise OSError(f"network disabled by the test ({name})")
        return blocked

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse(f"socket.{name}"))
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse(name))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # offline must not depend on these being set
        monkeypatch.delenv(name, raising=False)

    run = tmp_path / "pre"
    assert run_cli(train_ssl.main, pretrain_args(tiny_data, run, **{"train.max_steps": 2})) == 0
    eval_args = ["--checkpoint", str(run), *data_args(tiny_data)]
    assert run_cli(knn.main, eval_args) == 0
    assert run_cli(linear.main, [*eval_args, "linear.epochs=2", "linear.lrs=[0.1]"]) == 0
    ft = tmp_path / "ft"
    assert run_cli(finetune_cli.main, finetune_args(tiny_data, ft, init=run, **{"train.epochs": 1})) == 0
    assert (run / "eval" / "knn.json").is_file() and (run / "eval" / "linear.json").is_file()
    assert (ft / "metrics.json").is_file()
    assert attempts == []
