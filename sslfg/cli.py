"""The command-line layer shared by every entry point: arguments, logging, one clear line for a
user error, the start-up summary and the metrics table."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from sslfg.config import ConfigError
from sslfg.data.images import DataError
from sslfg.engine.checkpoint import CheckpointWriteError
from sslfg.engine.loop import NonFiniteLossError
from sslfg.engine.preemption import INTERRUPTED, Interrupted, stop_message
from sslfg.engine.rundir import release_run_dirs
from sslfg.entrypoints import CommandParser
from sslfg.keys import format_keys
from sslfg.schema import EvalConfig

USER_ERRORS = (ConfigError, DataError, NonFiniteLossError, CheckpointWriteError)
COMMAND_STARTS = ("python ", "accelerate ")  # an indented docstring line starting so is an example command
@dataclass
class CommandLine:
    """What a command was asked to do: config files in merge order, key=value overrides, --check."""

    files: list[str]
    overrides: list[str]
    check: bool = False


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)`; a user error prints `error: <message>` (no traceback) and returns 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise to a user
    try:
        main(argv)
    except USER_ERRORS as e:
        for bar in list(tqdm._instances):  # a progress bar the error interrupted: end its line first
            bar.close()
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:  # a stop signal: the loop wrote a checkpoint (sslfg.engine.preemption)
        if e.is_main:
            print(stop_message(e, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside a training loop
        print(f"error: {INTERRUPTED}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        release_run_dirs()
    return 0


def user_message(error: BaseException) -> str:
    """The message of a user error. One raised in a DataLoader worker comes back as the same type with
    torch's "Caught <type> in DataLoader worker process N. Original Traceback ..." text, which ends
    with "<module>.<type>: <the message>": that message, without the worker's traceback."""
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        _, sep, message = text.rpartition(f"{type(error).__module__}.{type(error).__qualname__}: ")
        if sep:
            return message.strip()
    return text


def example_commands(doc: str) -> list[str]:
    """The example commands of an entry point's docstring: its indented lines that start with python or
    accelerate. They become the --help epilog; tests/test_docs_commands.py runs each one."""
    lines = [line.strip() for line in doc.splitlines() if line.startswith("    ")]
    return [line for line in lines if line.startswith(COMMAND_STARTS)]


class _HelpKeys(argparse.Action):
    """--help-keys: every config key of the command's `schema` (`sslfg.keys.format_keys`), then exit, as --help."""

    def __init__(self, option_strings: list[str], dest: str, schema: type) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="list every config key with its type, default, range and meaning, and exit")
        self.schema = schema

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(format_keys(self.schema))
        parser.exit()


def command_parser(doc: str, schema: type | None = None) -> argparse.ArgumentParser:
    """A parser whose description is `doc` without its example commands, which form the epilog; with the
    config `schema` the command reads, --help-keys lists its keys."""
    commands = example_commands(doc)
    text = "\n".join(line for line in doc.splitlines() if line.strip() not in commands).strip()
    examples = commands or ["%(prog)s --config RECIPE.yaml key=value ..."]
    epilog = ("examples:\n" if len(examples) > 1 else "example:\n") + "\n".join(f"  {c}" for c in examples)
    formatter = argparse.RawDescriptionHelpFormatter
    parser = CommandParser(description=text, epilog=epilog, formatter_class=formatter)
    if schema is not None:
        parser.add_argument("--help-keys", action=_HelpKeys, schema=schema)
    return parser


def parse_cli(argv: Sequence[str] | None, description: str,
              schema: type | None = None) -> tuple[str | None, list[str]]:
    """`--config PATH` and `key=value` overrides from `argv` (None: sys.argv), for `load_config`; --help-keys lists
    the keys of the config `schema`."""
    parser = command_parser(description, schema)
    parser.add_argument("--config", metavar="PATH", help="YAML recipe (may extend others with _base_:)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied after the YAML")
    args = parser.parse_intermixed_args(argv)
    return args.config, list(args.overrides)


def _add_common(parser: argparse.ArgumentParser, check: bool = True) -> None:
    parser.add_argument("--dataset", metavar="PATH", help="dataset recipe, e.g. configs/datasets/cub.yaml; "
                        "applied after --config")
    if check:
        parser.add_argument("--check", action="store_true", help="validate the recipe and the data, build the "
                            "model, print the start-up summary and exit without running")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied after the YAML files")


def recipe_files(args: argparse.Namespace) -> list[str]:
    """--config and --dataset, in that order; ConfigError when --dataset names a recipe that sets more than data
    (a pretraining recipe given as the dataset: its keys were refused one by one as unknown to the command)."""
    if args.dataset and os.path.isfile(args.dataset):
        with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):  # load_config names what is wrong with it
            raw = yaml.safe_load(Path(args.dataset).read_text(encoding="utf-8"))
            other = sorted(set(raw) - {"data", "_base_"}) if isinstance(raw, dict) else []
            if other:
                raise ConfigError(f"--dataset: {args.dataset} sets {', '.join(other)}, not only data: it is not a "
                                  "dataset recipe (only `data:` keys, e.g. configs/datasets/cub.yaml); give a "
                                  "recipe with --config, the data with --dataset")
    return [p for p in (args.config, args.dataset) if p]


def parse_run_cli(argv: Sequence[str] | None, description: str, check: bool = True,
                  schema: type | None = None) -> CommandLine:
    """Flags of the recipe commands (train_ssl, eval.finetune; sslfg.data.build.stats without --check):
    --config, --dataset, --check, key=value, and --help-keys for the command's config `schema`."""
    parser = command_parser(description, schema)
    parser.add_argument("--config", metavar="PATH", help="YAML recipe (may extend others with _base_:)")
    _add_common(parser, check)
    args = parser.parse_intermixed_args(argv)
    return CommandLine(recipe_files(args), list(args.overrides), check and args.check)


# a command's own flag -> the config key it sets, its type and help
Option = tuple[str, str, type, str]


def parse_eval_cli(argv: Sequence[str] | None, description: str, options: Sequence[Option] = ()) -> CommandLine:
    """Flags of the eval commands (and a command's own `options`) → config files, key=value overrides and
    --check for `load_config`; --help-keys lists EvalConfig's keys."""
    parser = command_parser(description, EvalConfig)
    parser.add_argument("--config", metavar="PATH", help="YAML recipe of EvalConfig keys")
    parser.add_argument("--checkpoint", metavar="PATH", help="sslfg run directory (its config.yaml gives the "
                        "data settings the command line leaves unset, unless --config/--dataset name the data) or "
                        "weights file")
    parser.add_argument("--model", metavar="NAME", help="timm model name (weights file or --random-init)")
    parser.add_argument("--random-init", action="store_true", help="random weights: the floor")
    parser.add_argument("--pretrained", action="store_true", help="timm's weights for --model (name.tag or "
                        "hf-hub:org/repo) from the Hugging Face cache")
    parser.add_argument("--output", metavar="PATH", help="also write the metrics JSON to this .json file (a "
                        "file of its own: never one the command did not write)")
    for flag, key, kind, text in options:
        parser.add_argument(flag, dest=key, type=kind, metavar=key.rpartition(".")[2].upper(), help=f"{text} ({key})")
    _add_common(parser)
    args = parser.parse_intermixed_args(argv)
    flags = {"checkpoint": args.checkpoint, "model": args.model, "output": args.output}
    flags |= {key: getattr(args, key) for _, key, _, _ in options}
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    overrides += ["random_init=true"] if args.random_init else []
    overrides += ["pretrained=true"] if args.pretrained else []
    return CommandLine(recipe_files(args), overrides + list(args.overrides), args.check)


def print_summary(summary: dict[str, Any]) -> None:
    """The start-up summary, one `key: value` line each."""
    print("start-up summary:")
    for key, value in summary.items():
        print(f"  {key}: {value}")


def print_metrics(metrics: dict[str, float], path: Path) -> None:
    """A command's final metrics as `format_table` and the file that holds them."""
    print(format_table(metrics))
    print(f"metrics: {path}")


RATIO_SUFFIXES = ("lift",)  # metrics that are ratios, not fractions: printed as they are, not in %


def format_table(metrics: dict[str, float]) -> str:
    """Metric keys as a two-column markdown table: fractions in %, ratios (e.g. keep lift) as ×."""
    rows = [f"| {key} | {value:.2f}× |" if key.endswith(RATIO_SUFFIXES) else f"| {key} | {100 * value:.2f} % |"
            for key, value in metrics.items()]
    return "\n".join(["| metric | value |", "|---|---|", *rows])
