"""The command-line layer shared by every entry point: arguments, logging, one clear line for a
user error, and the run-and-report tail of the frozen-feature evaluations."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

from sslfg.config import ConfigError, load_config
from sslfg.data.images import DataError
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.loop import NonFiniteLossError
from sslfg.engine.rundir import ensure_writable
from sslfg.evaluation import backbone_spec, build_backbone, output_dir, record, write_metrics
from sslfg.schema import EvalConfig

USER_ERRORS = (ConfigError, DataError, NonFiniteLossError)

# (cfg, backbone, accelerator, output dir) -> (metrics, protocol) on the main process, None elsewhere
Evaluate = Callable[[EvalConfig, VisionTransformer, Accelerator, Path], "tuple[dict, dict] | None"]


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv)`; a user error prints `error: <message>` (no traceback) and returns 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except USER_ERRORS as e:
        for bar in list(tqdm._instances):  # a progress bar the error interrupted: end its line first
            bar.close()
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
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


def parse_cli(argv: Sequence[str] | None, description: str) -> tuple[str | None, list[str]]:
    """`--config PATH` and `key=value` overrides from `argv` (None: sys.argv), for `load_config`."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="example:\n  %(prog)s --config configs/pretrain/cub.yaml train.epochs=10 model.keep_ratio=0.5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="PATH", help="YAML recipe (may extend others with _base_:)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied after the YAML")
    args = parser.parse_intermixed_args(argv)
    return args.config, list(args.overrides)


def parse_eval_cli(argv: Sequence[str] | None, description: str) -> tuple[list[str], list[str]]:
    """Flags of the eval commands → (config files, key=value overrides) for `load_config`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH", help="YAML recipe of EvalConfig keys")
    parser.add_argument("--dataset", metavar="PATH", help="dataset recipe, e.g. configs/datasets/cub.yaml")
    parser.add_argument("--checkpoint", metavar="PATH", help="sslfg run directory or weights file")
    parser.add_argument("--model", metavar="NAME", help="timm model name (weights file or --random-init)")
    parser.add_argument("--random-init", action="store_true", help="random weights: the floor")
    parser.add_argument("--output", metavar="PATH", help="also write the metrics JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    flags = {"checkpoint": args.checkpoint, "model": args.model, "output": args.output}
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    overrides += ["random_init=true"] if args.random_init else []
    return [p for p in (args.config, args.dataset) if p], overrides + list(args.overrides)


def run_evaluation(argv: Sequence[str] | None, description: str, name: str, evaluate: Evaluate) -> dict:
    """Config, accelerator and frozen backbone; `evaluate` returns (metrics, protocol) on the main
    process (None elsewhere); the result is written to <output_dir>/<name>.json and printed."""
    cfg = load_config(*parse_eval_cli(argv, description), EvalConfig)
    accelerator = make_accelerator()
    out = ensure_writable(output_dir(cfg, {"backbone": backbone_spec(cfg)[0]}))  # before any time is spent
    if cfg.output:
        ensure_writable(Path(cfg.output).parent, "output")
    vit, info = build_backbone(cfg)
    produced = evaluate(cfg, vit, accelerator, out)
    result: dict = {}
    if accelerator.is_main_process and produced is not None:
        metrics, protocol = produced
        result = record(cfg, info, protocol, metrics)
        path = write_metrics(out, name, result, cfg.output)
        print(format_table(metrics))
        print(f"metrics: {path}")
    accelerator.wait_for_everyone()
    return result


def format_table(metrics: dict[str, float]) -> str:
    """Metric keys as a two-column markdown table, values in %."""
    rows = [f"| {key} | {100 * value:.2f} |" for key, value in metrics.items()]
    return "\n".join(["| metric | % |", "|---|---|", *rows])
