"""Does a change of the code change a number? Pretrains a few steps of each sample recipe with the code on the path
on the bundled sample, then compares every file of two such runs (before and after the change): metrics.jsonl value
by value, checkpoint tensors bitwise (the optimizer's state as a set of tensors, so that a new parameter-group order
still compares), other files byte by byte; run times and absolute paths are left out.

    PYTHONPATH=/path/to/old/checkout python bench/same_numbers_methods.py run /tmp/before
    python bench/same_numbers_methods.py run /tmp/after --set dino_wd0 method.dino.freeze_last_layer=0
    python bench/same_numbers_methods.py compare /tmp/before /tmp/after

`--set ARM KEY=VALUE` adds an override to one arm (a key the old code does not know). The `*_wd0` arms run without
weight decay, so that a change of the weight-decay groups alone leaves them equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sslfg.config import load_config
from sslfg.pretrain import pretrain
from sslfg.schema import PretrainConfig

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["data.num_workers=0", "train.max_steps=4", "train.batch_size=32", "train.checkpoint_every=2",
          "train.log_every=1", "train.knn_samples=64", "train.figure_samples=2"]
WD0 = ["train.weight_decay=0", "train.weight_decay_end=0"]
ARMS = {"lodisc": ("sample.yaml", []), "byol": ("byol_sample.yaml", []), "byol_wd0": ("byol_sample.yaml", WD0),
        "dino": ("dino_sample.yaml", []), "dino_wd0": ("dino_sample.yaml", WD0)}
VOLATILE = {"seconds", "images_per_second", "checkpoint", "output_dir", "data.root", "resume"}  # times and paths


def run(out: Path, data: Path, extra: dict[str, list[str]]) -> None:
    for arm, (recipe, overrides) in ARMS.items():
        cfg = load_config(ROOT / "configs" / "pretrain" / recipe, [*COMMON, *overrides, *extra.get(arm, []),
                                                                    f"output_dir={out / arm}", f"data.root={data}"],
                          PretrainConfig)
        pretrain(cfg)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    flat = [v for s in state["state"].values() for v in s.values()] if "state" in state else []
    return {hashlib.sha1(t.numpy().tobytes()).hexdigest(): t for t in flat if isinstance(t, torch.Tensor)}


def _json_values(path: Path) -> list:
    text = path.read_text()
    rows = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
    return [{k: v for k, v in r.items() if k not in VOLATILE and not k.endswith(".source")}  # recipe paths
            if isinstance(r, dict) else r for r in rows]


def compare_file(a: Path, b: Path) -> str:
    """'' when equal, else what differs."""
    if a.suffix in (".safetensors", ".bin"):
        ta, tb = _tensors(a), _tensors(b)
        if ta.keys() != tb.keys():
            return f"tensors differ: {len(ta.keys() - tb.keys())} only before, {len(tb.keys() - ta.keys())} only after"
        bad = [k for k in ta if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
        return f"{len(bad)} of {len(ta)} tensors differ, e.g. {bad[:3]}" if bad else ""
    if a.suffix in (".jsonl", ".json"):
        va, vb = _json_values(a), _json_values(b)
        if va == vb:
            return ""
        diff = [(i, k, r[k], s.get(k)) for i, (r, s) in enumerate(zip(va, vb, strict=False)) if isinstance(r, dict)
                for k in r.keys() | s.keys() if r.get(k) != s.get(k)]
        return f"values differ ({len(va)} / {len(vb)} rows), e.g. {diff[:3]}"
    if a.name in ("config.yaml", ".sslfg-run.lock"):
        return ""  # the recipe as run (paths, any --set key); the lock's process id
    return "" if a.read_bytes() == b.read_bytes() else "bytes differ"


def compare(before: Path, after: Path) -> int:
    differ = 0
    for arm in ARMS:
        files = sorted({p.relative_to(d) for d in (before / arm, after / arm) for p in d.rglob("*") if p.is_file()})
        for rel in files:
            a, b = before / arm / rel, after / arm / rel
            verdict = "only in one run" if not (a.is_file() and b.is_file()) else compare_file(a, b)
            if verdict and rel.parts[0] in ("tensorboard", "logs"):
                verdict = ""  # event files carry wall times
            differ += bool(verdict)
            print(f"{arm}/{rel}: {verdict or 'same'}")
    print(f"{differ} files differ")
    return int(differ > 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--data", type=Path, default=ROOT / "data" / "sample", help="the sample (make data)")
    r.add_argument("--set", nargs=2, action="append", default=[], metavar=("ARM", "KEY=VALUE"))
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = p.parse_args()
    if args.command == "run":
        extra: dict[str, list[str]] = {}
        for arm, kv in args.set:
            extra.setdefault(arm, []).append(kv)
        run(args.out, args.data.resolve(), extra)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
