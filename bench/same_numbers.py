"""Proof that a refactor changes no number: the same tiny pretraining (MoCo v3 + LoDisc's local branch, online kNN
and keep precision) and the frozen-feature evaluations (eval.knn, eval.linear, eval.localise) run once with the
code of an earlier checkout and once with this one, on the same tiny data, then every output file is compared.

    git archive main | tar -x -C /tmp/before   # the earlier code, e.g. the commit a branch started from
    PYTHONPATH=. python bench/same_numbers.py --before /tmp/before --out /tmp/same_numbers

Each side runs in its own checkout (cwd and PYTHONPATH), one CPU thread, so both are deterministic. A file
compares as: `same` (identical bytes), `same values` (JSON/YAML/text equal once the side's output path and the
wall-time fields are masked; checkpoints and weights: every tensor equal), or `DIFFERENT` (what differs). Exits
1 when any file differs or is missing on one side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import write_csv_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
        "method.mocov3.proj_hidden_dim=64", "method.mocov3.pred_hidden_dim=64"]
DATA = ["data.image_size=32", "data.num_workers=0", "data.train_split=train", "data.boxes=true"]
TRAIN = ["train.epochs=2", "train.batch_size=8", "train.checkpoint_every=3", "train.log_every=1",
         "train.knn_every=1", "train.loc_every=1", "train.figure_samples=2", "method.local.keep_ratio=0.5"]
EVALS = {"knn": ["knn.val=true"], "linear": ["linear.epochs=2", "linear.batch_size=8"], "localise": []}
# values that are wall times, dates or machine facts, not results of the computation
MASKED_KEY = re.compile(r"(^|[._])(time|second|elapsed|date|started|finished|wall|host|pid|throughput)|_s$|/s$")
# tensorboard names its files by wall time, host and process id: <time>/events.out.tfevents.<time>.<host>.<pid>.<n>
EVENT_NAME = re.compile(r"tfevents\.\d+\.[^/]+\.\d+(?=\.\d+$)|(?<=tensorboard/)\d{9,}\.\d+")


def run_side(code: Path, data: Path, out: Path) -> None:
    """The pretraining and the evaluations with the code of checkout `code`, outputs under `out`."""
    env = os.environ | {"PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    run = out / "run"
    commands = [[sys.executable, "train_ssl.py", "--config", "configs/pretrain/sample.yaml", f"data.root={data}",
                 f"output_dir={run}", *DATA, *TINY, *TRAIN]]
    commands += [[sys.executable, "-m", f"eval.{name}", "--checkpoint", str(run), *args]
                 for name, args in EVALS.items()]
    with open(out.parent / f"{out.name}.log", "w") as log:
        for command in commands:
            subprocess.run(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def masked(value: Any, roots: tuple[str, ...], key: str = "") -> Any:
    """`value` with the side's output paths replaced by <out> and wall-time fields by <masked>."""
    if MASKED_KEY.search(key.lower()):
        return "<masked>"
    if isinstance(value, dict):
        return {k: masked(v, roots, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<out>")
    return value


def normalised(rel: Path) -> str:
    """A file's path with tensorboard's wall times, host and process id masked."""
    return EVENT_NAME.sub("<t>", str(rel))


def events_of(path: Path) -> list[tuple[int, str, Any]]:
    """(step, tag, value) of every scalar of a tensorboard event file, without its wall times."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [(event.step, value.tag, value.simple_value or tuple(value.tensor.float_val))
            for event in EventFileLoader(str(path)).Load() for value in event.summary.value]


def tensors_of(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=False)


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def parsed(path: Path, roots: tuple[str, ...]) -> Any:
    """A text output as data: JSON, JSON lines, YAML, else its lines with timestamps masked."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return masked(yaml.safe_load(text), roots)
    try:
        return masked(json.loads(text), roots)
    except json.JSONDecodeError:
        pass
    try:
        return [masked(json.loads(line), roots) for line in text.splitlines()]
    except json.JSONDecodeError:
        return masked(text.splitlines(), roots)


def compare(a: Path, b: Path, roots: tuple[str, ...]) -> str:
    if a.read_bytes() == b.read_bytes():
        return "same"
    if "tfevents" in a.name:
        return "same values" if events_of(a) == events_of(b) else "DIFFERENT events"
    if a.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        return "same values" if equal(tensors_of(a), tensors_of(b)) else "DIFFERENT tensors"
    try:
        left, right = parsed(a, roots[:2]), parsed(b, roots[2:])
    except UnicodeDecodeError:
        return "DIFFERENT bytes"
    if left == right:
        return "same values"
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        first = next(i for i, (x, y) in enumerate(zip(left, right, strict=True)) if x != y)
        return f"DIFFERENT at item {first}: {str(left[first])[:200]} | {str(right[first])[:200]}"
    return "DIFFERENT values"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the earlier code")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout of the new code (default: this one)")
    parser.add_argument("--out", type=Path, required=True, help="working folder (data, both sides' outputs)")
    args = parser.parse_args()
    data = args.out / "data"
    if not data.is_dir():
        write_csv_dataset(data, n_train=24, n_test=8, size=32, boxes=True)
    sides = {name: args.out / name for name in ("before", "after")}
    for name, code in (("before", args.before), ("after", args.after)):
        if not sides[name].is_dir():
            run_side(code.resolve(), data.resolve(), sides[name])
    found = [{normalised(p.relative_to(s)): p for p in s.rglob("*") if p.is_file()} for s in sides.values()]
    files = sorted(found[0].keys() | found[1].keys())
    # each side's output folder and code checkout (in a command line) read as <out>
    roots = (str(sides["before"].resolve()), str(args.before.resolve()), str(sides["after"].resolve()),
             str(args.after.resolve()))
    different = 0
    for rel in files:
        a, b = (side.get(rel) for side in found)
        verdict = compare(a, b, roots) if a and b else "DIFFERENT: missing on one side"
        different += verdict.startswith("DIFFERENT")
        print(f"{verdict:12s} {rel}")
    print(f"{len(files)} files, {different} different")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
