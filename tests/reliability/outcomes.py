"""Helpers of the reliability suite: the user-facing outcome of a command that must fail cleanly."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from sslfg.cli import run_cli


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
