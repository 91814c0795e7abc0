"""Proof that a change moves no number: the same runs with the code of an earlier checkout and with this one,
then every output file compared. Two run sets (`--set`, default both):

- pipeline: a tiny pretraining (MoCo v3 + LoDisc's local branch, online kNN and keep precision) on generated tiny
  data with boxes, then eval.knn, eval.linear and eval.localise of it;
- methods: 4 steps of each sample recipe (LoDisc, BYOL, DINO, and BYOL and DINO without weight decay, so that a
  change of the weight-decay groups alone leaves those equal) on the bundled sample (`--data`, `make data`).

    git archive main | tar -x -C /tmp/before   # the earlier code, e.g. the commit a branch started from
    PYTHONPATH=. python bench/same_numbers.py --before /tmp/before --out /tmp/same_numbers
    PYTHONPATH=. python bench/same_numbers.py --before /tmp/before --out /tmp/sn --set methods \
        --override dino_wd0 method.dino.freeze_last_layer=0

`--override ARM KEY=VALUE` adds an override to one methods arm on the new side only (a key the old code does not
know); the compared config.yaml and summary.json leave that key out. Each side runs in its own checkout (cwd and
PYTHONPATH), one CPU thread, so both are deterministic; a side whose output folder exists is not run again. A file
compares as: `same` (identical bytes), `same values` (JSON/YAML/text equal once the side's output path and the
wall-time fields are masked; checkpoints and weights: every tensor equal, an optimizer's state as a set of tensors
so that a new parameter-group order still compares), or `DIFFERENT` (what differs). Exits 1 when any file differs
or is missing on one side.
"""

from __future__ import annotations

import argparse
import hashlib
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
METHODS_COMMON = ["data.num_workers=0", "train.max_steps=4", "train.batch_size=32", "train.checkpoint_every=2",
                  "train.log_every=1", "train.knn_samples=64", "train.figure_samples=2"]
WD0 = ["train.weight_decay=0", "train.weight_decay_end=0"]
ARMS = {"lodisc": ("sample.yaml", []), "byol": ("byol_sample.yaml", []), "byol_wd0": ("byol_sample.yaml", WD0),
        "dino": ("dino_sample.yaml", []), "dino_wd0": ("dino_sample.yaml", WD0)}
SETS = ("pipeline", "methods")
# values that are wall times, dates or machine facts, not results of the computation
MASKED_KEY = re.compile(r"(^|[._])(time|second|elapsed|date|started|finished|wall|host|pid|throughput)|_s$|/s$")
# tensorboard names its files by wall time, host and process id: <time>/events.out.tfevents.<time>.<host>.<pid>.<n>
EVENT_NAME = re.compile(r"tfevents\.\d+\.[^/]+\.\d+(?=\.\d+$)|(?<=tensorboard/)\d{9,}\.\d+")


def pipeline_commands(data: Path, out: Path) -> list[list[str]]:
    """The tiny pretraining and the three evaluations of it, outputs under `out`."""
    run = out / "run"
    commands = [["train_ssl.py", "--config", "configs/pretrain/sample.yaml", f"data.root={data}", f"output_dir={run}",
                 *DATA, *TINY, *TRAIN]]
    return commands + [["-m", f"eval.{name}", "--checkpoint", str(run), *args] for name, args in EVALS.items()]


def methods_commands(data: Path, out: Path, overrides: dict[str, list[str]]) -> list[list[str]]:
    """A few steps of each sample recipe (`ARMS`), with `overrides` per arm, outputs under out/<arm>."""
    return [["train_ssl.py", "--config", f"configs/pretrain/{recipe}", *METHODS_COMMON, *arm_overrides,
             *overrides.get(arm, []), f"output_dir={out / arm}", f"data.root={data}"]
            for arm, (recipe, arm_overrides) in ARMS.items()]


def run_side(code: Path, commands: list[list[str]], log_path: Path) -> None:
    """`commands` (python's arguments) with the code of checkout `code`, their output into `log_path`."""
    env = os.environ | {"PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    with open(log_path, "w") as log:
        for command in commands:
            subprocess.run([sys.executable, *command], cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT,
                           check=True)


def masked(value: Any, roots: tuple[str, ...], key: str = "", dropped: tuple[str, ...] = ()) -> Any:
    """`value` with the side's output paths replaced by <out>, wall-time fields by <masked>, and the dotted keys
    `dropped` (flat as in summary.json, with their .source, or nested as in config.yaml) left out."""
    if MASKED_KEY.search(key.lower()):
        return "<masked>"
    if isinstance(value, dict):
        kept = {k: v for k, v in value.items() if str(k).removesuffix(".source") not in dropped}
        return {k: masked(v, roots, str(k), tuple(d.split(".", 1)[1] for d in dropped if d.startswith(f"{k}.")))
                for k, v in kept.items()}
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
    """A weights file's tensors; an optimizer's state as {hash: tensor}, so that the order of its groups is free."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("state"), dict):
        flat = [v for s in state["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
        return {hashlib.sha1(t.numpy().tobytes()).hexdigest() + str(t.dtype): t for t in flat}
    return state


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def parsed(path: Path, roots: tuple[str, ...], dropped: tuple[str, ...]) -> Any:
    """A text output as data: JSON, JSON lines, YAML, else its lines with timestamps masked."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return masked(yaml.safe_load(text), roots, dropped=dropped)
    try:
        return masked(json.loads(text), roots, dropped=dropped)
    except json.JSONDecodeError:
        pass
    try:
        return [masked(json.loads(line), roots, dropped=dropped) for line in text.splitlines()]
    except json.JSONDecodeError:
        return masked(text.splitlines(), roots)


def compare(a: Path, b: Path, roots: tuple[str, ...], dropped: tuple[str, ...] = ()) -> str:
    if a.read_bytes() == b.read_bytes():
        return "same"
    if "tfevents" in a.name:
        return "same values" if events_of(a) == events_of(b) else "DIFFERENT events"
    if a.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        return "same values" if equal(tensors_of(a), tensors_of(b)) else "DIFFERENT tensors"
    try:
        left, right = parsed(a, roots[:2], dropped), parsed(b, roots[2:], dropped)
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
    parser.add_argument("--set", choices=SETS, action="append", dest="sets", help="run set; default: both")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "sample", help="the methods set's data")
    parser.add_argument("--override", nargs=2, action="append", default=[], metavar=("ARM", "KEY=VALUE"),
                        help=f"a methods arm's extra override on the new side ({', '.join(ARMS)})")
    args = parser.parse_args()
    overrides: dict[str, list[str]] = {}
    for arm, kv in args.override:
        overrides.setdefault(arm, []).append(kv)
    sets = args.sets or SETS
    tiny = args.out / "data"
    if "pipeline" in sets and not tiny.is_dir():
        write_csv_dataset(tiny, n_train=24, n_test=8, size=32, boxes=True)
    sides = {name: args.out / name for name in ("before", "after")}
    for name, code in (("before", args.before), ("after", args.after)):
        for run_set in sets:
            out = sides[name] / run_set
            if not out.is_dir():
                commands = (pipeline_commands(tiny.resolve(), out.resolve()) if run_set == "pipeline" else
                            methods_commands(args.data.resolve(), out.resolve(), overrides if name == "after" else {}))
                run_side(code.resolve(), commands, args.out / f"{name}_{run_set}.log")  # not compared: timings
    found = [{normalised(p.relative_to(side)): p for run_set in sets for p in (side / run_set).rglob("*")
              if p.is_file()} for side in sides.values()]
    files = sorted(found[0].keys() | found[1].keys())
    # each side's output folder and code checkout (in a command line) read as <out>
    roots = (str(sides["before"].resolve()), str(args.before.resolve()), str(sides["after"].resolve()),
             str(args.after.resolve()))
    dropped = tuple(kv.split("=", 1)[0] for kv in sum(overrides.values(), []))
    different = 0
    for rel in files:
        a, b = (side.get(rel) for side in found)
        verdict = compare(a, b, roots, dropped) if a and b else "DIFFERENT: missing on one side"
        different += verdict.startswith("DIFFERENT")
        print(f"{verdict:12s} {rel}")
    print(f"{len(files)} files, {different} different")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
