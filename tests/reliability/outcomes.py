"""Helpers of the reliability suite: the user-facing outcome of a command that must fail cleanly."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslfg.cli import run_cli
from sslfg.engine.checkpoint import checkpoint_dirs


def user_error(main: Callable[[Sequence[str] | None], object], argv: Sequence[str],
               capsys: pytest.CaptureFixture[str]) -> str:
    """Runs an entry point's `main` as its command line does; asserts the documented outcome of a user
    error (exit code 2, exactly one `error:` line on stderr, no traceback) and returns the message."""
    capsys.readouterr()  # only this command's output
    code = run_cli(main, list(argv))
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, expected 2; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one 'error:' line, got {len(lines)}:\n{err[-3000:]}"
    return err[err.index("error: ") + len("error: "):].strip()


class Recorder:
    """Stands in for a function (patched in with monkeypatch) and records every call, then calls it."""

    def __init__(self, function: Callable) -> None:
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def assert_same_training(one: Path, two: Path, steps: list[int]) -> dict[str, torch.Tensor]:
    """Two pretraining runs at the same global batch (one process against two processes or machines) logged
    `steps` with the same lr and momentum, losses within 1e-4 relative, and end with the same weights and
    buffers within 1e-4; returns the first run's final checkpoint tensors."""
    metrics = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]
    assert [m["step"] for m in metrics[0]] == [m["step"] for m in metrics[1]] == steps
    for a, b in zip(*metrics, strict=True):
        assert a["lr"] == b["lr"] and a.get("momentum") == b.get("momentum")  # none without a teacher
        for key in ("loss", "loss_global", "loss_local"):
            assert abs(a[key] - b[key]) < 1e-4 * abs(a[key]), (key, a, b)
    weights = [load_file(str(checkpoint_dirs(r)[-1] / "model.safetensors")) for r in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-4, msg=key)
    return weights[0]
