"""Which sslfg modules run as commands, how a command starts, and one clear error for the others.

`python -m sslfg.export` (or `python sslfg/export.py`) would import a library module and exit 0 having done nothing,
so a user who mistook it for `python -m eval.export` would believe it had run. `import sslfg` calls
`refuse_library_module` before anything else: run as a program, a module that is not in `RUNNABLE` stops with one
line naming the command to use (the one its name is part of, e.g. sslfg.evaluation.knn → sslfg-knn) and status 2.

Every command starts through `launch`, light until then (this module imports only the standard library), so that a
Ctrl-C during its imports (torch, timm: seconds) is one line, not Python's traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from functools import partial
from pathlib import Path
from typing import NoReturn

# the modules with a `__main__` block (tests/test_cli.py checks the list against the sources)
RUNNABLE = frozenset({"sslfg.study", "sslfg.study.__main__", "sslfg.study.report", "sslfg.data.shards",
                      "sslfg.data.build.sample", "sslfg.data.build.cluttered", "sslfg.data.build.cub",
                      "sslfg.data.build.stats"})
# console command -> the checkout's entry point (pyproject.toml's [project.scripts]; README.md)
COMMANDS = {"sslfg-pretrain": "python train_ssl.py", "sslfg-knn": "python -m eval.knn",
            "sslfg-linear": "python -m eval.linear", "sslfg-finetune": "python -m eval.finetune",
            "sslfg-localise": "python -m eval.localise", "sslfg-embed": "python -m eval.embed",
            "sslfg-export": "python -m eval.export", "sslfg-study": "python -m sslfg.study"}
STARTING = "interrupted (Ctrl-C) while starting, before it read or wrote anything; run the command again"
ALIASES = {"localisation": "localise", "knn_transfer": "knn"}  # module name parts that are another command's code


def module_run() -> str:
    """The sslfg module this process was started to run (`python -m NAME` or `python PATH.py`), '' for none."""
    if sys.argv[:1] == ["-m"]:  # runpy is importing the module's packages: argv[0] is "-m" until it runs
        token = sys.orig_argv[-len(sys.argv)]  # the argument after -m, or "-mNAME" / "-BmNAME" glued
        return token.partition("m")[2] if token.startswith("-") else token
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else None
    package = Path(__file__).resolve().parent
    if script is None or not script.resolve().is_relative_to(package):
        return ""
    return ".".join(("sslfg", *script.resolve().relative_to(package).with_suffix("").parts))


def refuse_library_module() -> None:
    """Exits with status 2 and one line naming the command to use when this process runs an sslfg module that is
    not a command (`RUNNABLE`); nothing otherwise."""
    name = module_run()
    if not (name == "sslfg" or name.startswith("sslfg.")) or name in RUNNABLE:
        return
    parts = [ALIASES.get(part, part) for part in reversed(name.split("."))]
    command = next((f"sslfg-{p}" for p in parts if f"sslfg-{p}" in COMMANDS), "")
    below = sorted(m for m in RUNNABLE if m.startswith(f"{name}.") and not m.endswith(".__main__"))
    if command:
        advice = f"run `{command}` (from a checkout also `{COMMANDS[command]}`) with the same arguments"
    elif below and name != "sslfg":
        advice = f"its programs are {', '.join(f'python -m {m}' for m in below)}"
    else:
        advice = f"the commands are {', '.join(COMMANDS)} (from a checkout {', '.join(COMMANDS.values())})"
    what = "sslfg is a library" if name == "sslfg" else f"{name} is a module of the sslfg library"
    print(f"error: {what}, not a command, and does nothing when run; {advice}", file=sys.stderr)
    sys.exit(2)


def command_words() -> list[str]:
    """How this process was started, without its arguments: ["python", "-m", "eval.knn"], ["python", "train_ssl.py"]
    or an installed console command's name, ["sslfg-knn"] (a script without .py, e.g. .venv/bin/sslfg-knn)."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is not None:
        return ["python", "-m", spec.name.removesuffix(".__main__")]
    if sys.argv[0].endswith(".py"):
        return ["python", sys.argv[0]]
    return [Path(sys.argv[0]).name]


class CommandParser(argparse.ArgumentParser):
    """argparse named as the command was typed (`python -m eval.knn`, not knn.py) whose errors are one line:
    `error: <what argparse says>; see <command> --help`, status 2."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**{"prog": " ".join(command_words()), **kwargs})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def launch(module: str) -> NoReturn:
    """Imports `module` and runs its `main` through `sslfg.cli.run_cli` (one line for a user error or a stop), then
    exits with its status; a Ctrl-C during the imports is one line too, status 130."""
    try:
        from sslfg.cli import run_cli

        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print(f"error: {STARTING}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    sys.exit(run_cli(main))


# what pyproject.toml's [project.scripts] call: sslfg-pretrain = "sslfg.entrypoints:pretrain", ...
pretrain, finetune, knn, linear, localise, embed, export = (
    partial(launch, f"sslfg.commands.{name}") for name in ("pretrain", "finetune", "knn", "linear", "localise",
                                                           "embed", "export"))
study = partial(launch, "sslfg.study.run")
