"""How the commands are reached: the library (sslfg.commands holds every command's main) never imports
the repository-root entry points train_ssl.py and eval/, which only an uninstalled checkout has; and a
stopped run names the command that continues it as it was launched, a console command by its name."""

from __future__ import annotations

import ast
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from sslfg.engine import preemption

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("train_ssl", "eval")  # the top-level names of the repository-root entry points


def imported_modules(path: Path) -> list[str]:
    """The absolute imports of a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
    return found


def test_the_library_never_imports_an_entry_point() -> None:
    offending = [f"{path.relative_to(ROOT)}: import {name}" for path in sorted((ROOT / "sslfg").rglob("*.py"))
                 for name in imported_modules(path) if name.split(".")[0] in ENTRY_POINTS]
    assert not offending


@pytest.mark.parametrize("argv0, main_module, processes, launched", [
    ("train_ssl.py", None, 1, "python train_ssl.py"),
    ("/repo/eval/knn.py", "eval.knn", 2, "accelerate launch --multi_gpu --num_processes 2 -m eval.knn"),
    ("/repo/.venv/bin/sslfg-pretrain", None, 1, "sslfg-pretrain"),
    ("/repo/.venv/bin/sslfg-pretrain", None, 2,
     "accelerate launch --no_python --multi_gpu --num_processes 2 sslfg-pretrain"),
])
def test_the_continue_command_is_launched_as_the_stopped_one(argv0: str, main_module: str | None, processes: int,
                                                              launched: str, monkeypatch: pytest.MonkeyPatch) -> None:
    main = types.ModuleType("__main__")
    main.__spec__ = ModuleSpec(main_module, None) if main_module else None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", [argv0])
    monkeypatch.setattr(preemption, "world_size", lambda: processes)
    command = preemption.continue_command(["--config", "r.yaml", "resume=no"], "resume")
    assert command == f"{launched} --config r.yaml resume=auto"
