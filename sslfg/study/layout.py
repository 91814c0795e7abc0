"""Where a study keeps its arms, so that the runner and the report agree.

    <study>/study.yaml                    the resolved study config
    <study>/machine.json                  what it ran on
    <study>/budget.json                   the pretraining epochs every arm gets (fixed at the first run)
    <study>/seed<s>/<arm>/                a pretraining run; its evaluations (knn, linear, localise) in eval/
    <study>/seed<s>/random/eval/          the random-init floor; pixels/eval/ the raw-pixel floor
    <study>/seed<s>/supervised/           the supervised reference (a fine-tuning run), its evaluations in eval/
    <study>/seed<s>/finetune/<arm>/       a fine-tuning run
    <study>/done/<arm id>.json            written when an arm finished: its command and wall time
    <study>/report/                       report.md and its figures
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sslfg.config import ConfigError
from sslfg.engine.rundir import read_run_file

FLOORS = ("random", "pixels")
ARM_KEYS = {"pretrain": ("config", "vs"), "finetune": ("config", "init")}  # an arm's own keys, not overrides
SUPERVISED = "supervised"  # the supervised reference: a fine-tuning run in seed<s>/supervised/, its evals in eval/
KNN_KEY = "knn.k20.top1"  # the study's headline metric
VAL_KNN_KEY = f"val.{KNN_KEY}"  # the same on the validation split: what the fine-tuning init is chosen by
STUDY_FILE = "study.yaml"


def seed_dir(root: Path, seed: int) -> Path:
    return Path(root) / f"seed{seed}"


def pretrain_dir(root: Path, seed: int, arm: str) -> Path:
    return seed_dir(root, seed) / arm


def eval_dir(root: Path, seed: int, arm: str) -> Path:
    """The eval.knn / eval.linear output folder of a pretraining arm or a floor."""
    return pretrain_dir(root, seed, arm) / "eval"


def finetune_dir(root: Path, seed: int, arm: str) -> Path:
    return seed_dir(root, seed) / "finetune" / arm


def arm_id(seed: int, kind: str, arm: str) -> str:
    """e.g. 'seed0.knn.mocov3'; kind is pretrain, knn, linear or finetune."""
    return f"seed{seed}.{kind}.{arm}"


def done_dir(root: Path) -> Path:
    return Path(root) / "done"


def done_path(root: Path, arm: str) -> Path:
    return done_dir(root) / f"{arm}.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when the file does not exist (yet); one error naming a damaged one."""
    if not path.is_file():
        return None
    return read_run_file(path, "move it away with the arm's record in the study's done/ folder (the arm is the "
                               "seed<N>.<kind>.<arm> whose folder holds it), then run the study again: it reruns every "
                               "arm without a record")


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl ([] when it has none); one error naming the file and line of a damaged
    record (a line cut short by a full disk, an edit)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise ConfigError(f"{path}, line {number}: this record of an sslfg run cannot be read ({e}): it was cut "
                              "short or edited; remove that line and build the report again") from None
    return records


def best_pretrain_arm(root: Path, seeds: Sequence[int], arms: Sequence[str]) -> str | None:
    """The pretraining arm with the best mean kNN k20 top-1 on the validation split over the seeds that
    evaluated it (None before any did): never the test split, which only reports."""
    scores = {}
    for arm in arms:
        results = [read_json(eval_dir(root, s, arm) / "knn.json") for s in seeds]
        values = [r[VAL_KNN_KEY] for r in results if r and VAL_KNN_KEY in r]
        if values:
            scores[arm] = sum(values) / len(values)
    return max(scores, key=scores.__getitem__) if scores else None


def check_arm_name(section: str, name: Any) -> None:
    """ConfigError for an arm name that is not one plain folder name of its own: the name is a folder of seed<s>/
    (pretraining) or seed<s>/finetune/ and part of done/'s file names, so a path ('a/b', '..') would write
    elsewhere, and a floor's name or seed<s>/'s fine-tuning folder would share a folder with another run."""
    taken = {**dict.fromkeys((*FLOORS, SUPERVISED), "a floor"),
             **({"finetune": "the fine-tuning arms' folder"} if section == "pretrain" else {})}
    if name in taken:
        raise ConfigError(f"{section}.arms: {name} is the name of {taken[name]} the study adds itself; rename the arm")
    if not isinstance(name, str) or name.strip(".") == "" or any(c in name for c in "/\\") or name != name.strip():
        raise ConfigError(f"{section}.arms: {name!r} is not a plain folder name (each arm's runs are in a folder "
                          "named after it); name the arm with letters, digits, '_', '-' or '.', e.g. lodisc_keep50")


def split_spec(name: str, spec: Any, section: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An arm's {config, vs | init, dotted key: value...} → (its own keys, its overrides)."""
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{section}.arms.{name}: expected a mapping of dotted keys to values, got {spec!r}")
    own = {k: spec[k] for k in ARM_KEYS[section] if k in spec}
    return own, {k: v for k, v in spec.items() if k not in own}
