"""Every command in README.md and in each entry point's --help exists and runs with --check, and every
repository path they mention exists.

Commands are the README's indented lines (4 spaces) starting with `python `, `accelerate `, `make ` or a
console command (`sslfg-knn ...`, pyproject.toml's [project.scripts]), and the lines under
"example:"/"examples:" in each --help; a trailing `# comment` is dropped. A console command is checked as
the entry point it equals (CONSOLE, itself checked against pyproject.toml).

How each is checked:
- train_ssl.py, eval.knn, eval.linear, eval.finetune run in this process through their `main` with
  `--check` added. `accelerate launch [options]` is dropped (one process here: --check builds the
  same things on every process).
- Placeholders stand for what a user has and this machine lacks (see `substitute`): run directories
  become a tiny pretraining run built here, a fine-tuning run's config.yaml that of a tiny fine-tuning run,
  a new pretraining or fine-tuning run (no resume) goes to a new output_dir (as it would on a user's
  machine, whatever this checkout's runs/ holds), and a pretrained weights file is dropped with its flag
  (`--checkpoint W --model M` becomes `--random-init --model M`, `init=W` and `model.weights=W` become
  scratch, as do `model.pretrained=true` and `--pretrained`): everything but that file's load is checked. A
  command that names a configs/ recipe or data.root gets `data.root=<tiny dataset>` (an eval_data.root becomes it too)
  (csv and imagefolder layouts in one folder, with object boxes), data.images_dir=images, data.num_classes=0 and
  data.num_workers=0 appended, and for eval.finetune train.warmup_steps=0 (the tiny data gives fewer
  steps than a recipe's warmup).
- sslfg.study, sslfg.study.report, sslfg.data.build.sample and sslfg.data.shards (no --check: they run a whole
  study or build data; tests/data/test_shards.py runs the shard writer's main)
  and make targets: the module imports and has a main / the Makefile has the target.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from sslfg.commands import embed, export, knn, linear, localise
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import pretrain as train_ssl
from sslfg.data.build import stats
from sslfg.entrypoints import COMMANDS
from sslfg.finetune import finetune
from sslfg.pretrain import pretrain
from sslfg.schema import FinetuneConfig
from tests.conftest import TINY_MODEL, tiny_config, write_csv_dataset

ROOT = Path(__file__).resolve().parents[1]
# console command -> the entry point it equals
CONSOLE = {name: command.split()[-1] for name, command in COMMANDS.items()}  # sslfg-knn: eval.knn, ...
COMMAND_START = ("python ", "accelerate ", "make ", *(f"{name} " for name in CONSOLE))
ENTRY_POINTS: dict[str, Callable] = {"train_ssl.py": train_ssl.main, "eval.knn": knn.main, "eval.linear": linear.main,
                                     "eval.finetune": finetune_cli.main, "sslfg.data.build.stats": stats.main,
                                     "eval.localise": localise.main, "eval.embed": embed.main,
                                     "eval.export": export.main}
NOT_CHECKABLE = ("sslfg.study", "sslfg.study.report", "sslfg.data.build.sample", "sslfg.data.shards")  # import + main
RUN_DIRS = ("runs/lodisc_cub", "runs/sample_lodisc", "runs/lodisc_cotton",
            "runs/cluttered_lodisc", "runs/cluttered_unlabelled")  # -> the tiny pretraining run
FINETUNE_CONFIGS = ("runs/glsim_sample/config.yaml",)  # -> the tiny fine-tuning run's recipe
TRAINING = ("train_ssl.py", "eval.finetune")  # the commands that start a run in output_dir
CONTINUES = ("resume=", "eval_only=", *(f"{d}/config.yaml" for d in RUN_DIRS), *FINETUNE_CONFIGS)  # a run's own
WEIGHTS = re.compile(r"\S*\.safetensors$")  # a user's pretrained weights file: dropped with its flag
REPO_PATH = re.compile(r"(?<![\w/.<-])((?:configs|sslfg|eval|tests|docs|bench)/[\w./-]*\w|train_ssl\.py|Makefile)")


def readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [strip_comment(line) for line in lines if line.startswith("    ") and line.strip().startswith(COMMAND_START)]


def help_commands(main: Callable, capsys: pytest.CaptureFixture[str]) -> list[str]:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    examples = re.split(r"\nexamples?:\n", text, maxsplit=1)[1]
    return [strip_comment(line) for line in examples.splitlines() if line.startswith("  ")]


def launched(name: str) -> str:
    """The module whose `main` `python -m name` (`python name.py`) runs: the one its main block hands to
    `sslfg.entrypoints.launch`, else itself."""
    spec = importlib.util.find_spec(name)
    path = Path(spec.submodule_search_locations[0]) / "__main__.py" if spec.submodule_search_locations else \
        Path(spec.origin)
    found = re.search(r'launch\("([\w.]+)"\)', path.read_text())
    return found[1] if found else name


def entry_module(name: str) -> ModuleType:
    return importlib.import_module(launched(name))


def strip_comment(line: str) -> str:
    return line.split("  #")[0].strip()


def entry_and_args(command: str) -> tuple[str, list[str]]:
    """`python -m X a b`, `python X.py a b`, `accelerate launch [opts] -m X a b` -> (X, [a, b]);
    a console command `sslfg-x a b` (also after `accelerate launch [opts]`) -> (what it equals, [a, b])."""
    words = shlex.split(command)
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
        while words and words[0].startswith("--"):
            words = words[2:] if words[0] == "--num_processes" else words[1:]
    elif words[0] == "python":
        words = words[1:]
    if words[0] in CONSOLE:
        return CONSOLE[words[0]], words[1:]
    return (words[1], words[2:]) if words[0] == "-m" else (words[0], words[1:])


def substitute(entry: str, args: list[str], run: Path, ft_config: Path, data_root: Path) -> list[str]:
    out: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if arg in RUN_DIRS:
            arg = str(run)
        elif sep and value in RUN_DIRS:  # init=runs/...
            arg = f"{key}={run}"
        elif arg.startswith(tuple(f"{d}/" for d in RUN_DIRS)):
            arg = str(run / arg.split("/", 2)[2])
        elif arg in FINETUNE_CONFIGS:
            arg = str(ft_config)
        elif sep and key in ("init", "model.weights") and WEIGHTS.match(value):
            continue  # scratch
        elif sep and key in ("data.root", "eval_data.root"):
            arg = f"{key}={data_root}"
        elif arg == "model.pretrained=true":  # hub weights need the network or a cache: checked from scratch
            continue
        elif arg == "--pretrained":
            arg = "--random-init"
        out.append(arg)
    if "--checkpoint" in out and WEIGHTS.match(out[out.index("--checkpoint") + 1]):
        i = out.index("--checkpoint")
        out[i: i + 2] = ["--random-init"]
    if entry in TRAINING and not any(a.startswith(CONTINUES) for a in out):  # a new run: into a new folder, as the
        # command's own output_dir would be on a user's machine (--check refuses one that holds a run's checkpoints)
        out = [*(a for a in out if not a.startswith("output_dir=")), f"output_dir={run.parent / 'new_run'}"]
    if not any(a.startswith("configs/") or a.startswith("data.root=") for a in out):
        return out
    # 256 images give a fine-tuning recipe a few optimizer steps, fewer than its warmup on the real data
    warmup = ["train.warmup_steps=0"] if entry == "eval.finetune" else []
    return [*out, f"data.root={data_root}", "data.images_dir=images", "data.num_classes=0", "data.num_workers=0",
            *warmup]


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tiny pretraining run, tiny fine-tuning run's recipe, data root holding the csv and imagefolder layouts);
    256 training images: one batch of the largest recipe."""
    tmp = tmp_path_factory.mktemp("docs")
    root = write_csv_dataset(tmp / "data", n_train=256, n_test=16, size=8, boxes=True)  # boxes: the cluttered recipes
    for split in ("train", "test"):  # imagefolder: root/<split>/<class>/<image>
        shutil.copytree(root / "images" / split, root / split)
    cfg = tiny_config(root, tmp / "run", max_steps=1, figure_samples=0)
    cfg.model.kwargs = {**TINY_MODEL["kwargs"], "depth": 3}  # ILA's default adapter positions need 3 blocks
    cfg.data.boxes = True  # eval.localise, given the run, reads its data with boxes
    run = pretrain(cfg)
    ft = FinetuneConfig(output_dir=str(tmp / "ft"))
    ft.data = cfg.data
    ft.model.name, ft.model.patch_size, ft.model.kwargs = TINY_MODEL["name"], 4, cfg.model.kwargs
    ft.model.top_k, ft.train.warmup_steps, ft.train.max_steps = 3, 0, 1
    finetune(ft)  # a checkpoint, for `eval_only=true`
    return run, tmp / "ft" / "config.yaml", root


def all_commands(capsys: pytest.CaptureFixture[str]) -> list[tuple[str, str]]:
    found = [("README.md", c) for c in readme_commands()]
    for name, main in ENTRY_POINTS.items():
        found += [(f"{name} --help", c) for c in help_commands(main, capsys)]
    return found


def test_every_documented_command_runs_with_check(placeholders: tuple[Path, Path, Path],
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # commands name repository-relative paths
    run, ft_config, data_root = placeholders
    commands = all_commands(capsys)
    assert len(commands) > 20
    checked = set()
    for where, command in commands:
        if command.startswith("make "):
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), re.M), (where, command)
            continue
        entry, args = entry_and_args(command)
        if entry in NOT_CHECKABLE:
            assert callable(entry_module(entry).main), (where, command)
            continue
        assert entry in ENTRY_POINTS, (where, command)
        argv = substitute(entry, args, run, ft_config, data_root)
        main = ENTRY_POINTS[entry]
        argv += ["--check"] if main is not stats.main else []
        try:
            main(argv)
        except Exception as e:  # noqa: BLE001 - report which documented command failed
            pytest.fail(f"{where}: `{command}` (run as {argv}) failed: {type(e).__name__}: {e}")
        checked.add(entry)
    capsys.readouterr()
    assert checked == set(ENTRY_POINTS)  # every entry point was exercised


def test_every_repository_path_mentioned_exists(capsys: pytest.CaptureFixture[str]) -> None:
    texts = [("README.md", (ROOT / "README.md").read_text())]
    texts += [(f"{name} --help", "\n".join(help_commands(main, capsys))) for name, main in ENTRY_POINTS.items()]
    missing = [(where, path) for where, text in texts for path in REPO_PATH.findall(text)
               if not (ROOT / path).exists()]
    assert not missing


def test_console_commands_are_the_entry_points() -> None:
    """pyproject.toml's console commands are CONSOLE's, each runs the main of the entry point it equals."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(CONSOLE)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        entry = CONSOLE[name]
        shim = entry.removesuffix(".py")  # train_ssl.py -> the module train_ssl
        assert getattr(importlib.import_module(module), function).args == (launched(shim),), name
        assert callable(entry_module(shim).main), name
