"""metrics.jsonl (one JSON object per logged step) and the trackers of `train.log_with`, written by the main
process. Trackers are Accelerate's classes: TensorBoard (the default), wandb, mlflow, aim and comet_ml, each
in the offline mode its own settings choose (e.g. WANDB_MODE=offline); they also get the resolved config,
flattened to dotted keys, as hyper-parameters."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker, TensorBoardTracker, get_available_trackers

from sslfg.config import ConfigError, to_dict
from sslfg.files import write_text

METRICS_FILE = "metrics.jsonl"
PROJECT = "sslfg"  # the tracker project (wandb, comet_ml) or experiment (mlflow, aim)
EXTRAS = ("wandb",)  # trackers with an sslfg extra in pyproject.toml; the others are installed by their own name


class MetricsLog:
    """Appends records; on resume from step s, first drops the records an interrupted run wrote
    after s (and a last line a crash cut short), so the file ends up identical to an uninterrupted run's.
    `trackers` (train.log_with) get the same finite scalars, and `config` as flat hyper-parameters."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None,
                 trackers: Sequence[str] = ("tensorboard",), config: Any = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        check_trackers(trackers)
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line in _complete_lines(self.path) if json.loads(line)["step"] <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.file = self.path.open("a")
        purge = None if resume_step is None else resume_step + 1
        self.trackers = [_tracker(name, Path(run_dir), purge) for name in dict.fromkeys(trackers)]
        for tracker in self.trackers:
            tracker.start()
            if config is not None:
                tracker.store_init_configuration(flat_config(config))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, float) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            for tracker in self.trackers:
                tracker.finish()


def check_trackers(names: Sequence[str]) -> None:
    """ConfigError naming what to install for a tracker of `train.log_with` whose package is missing."""
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in available:
            install = f"pip install -e '.[{name}]'" if name in EXTRAS else f"pip install {name}"
            raise ConfigError(f"train.log_with: the {name} tracker needs the {name} package, which is not installed; "
                              f"install it with `{install}`, or remove {name} from train.log_with")


def _tracker(name: str, run_dir: Path, purge_step: int | None) -> GeneralTracker:
    """Accelerate's tracker `name`, logging next to metrics.jsonl where it writes locally."""
    if name == "tensorboard":  # run_dir/tensorboard; on resume, events after the resumed step are dropped
        return TensorBoardTracker("tensorboard", run_dir, purge_step=purge_step)
    if name == "wandb":
        return LOGGER_TYPE_TO_CLASS[name](PROJECT, name=run_dir.name, dir=str(run_dir))
    if name == "aim":
        return LOGGER_TYPE_TO_CLASS[name](PROJECT, logging_dir=run_dir)
    if name == "mlflow":
        return LOGGER_TYPE_TO_CLASS[name](PROJECT, logging_dir=str(run_dir / "mlflow"), run_name=run_dir.name)
    return LOGGER_TYPE_TO_CLASS[name](PROJECT)  # comet_ml: its COMET_* settings


def flat_config(config: Any) -> dict[str, bool | int | float | str]:
    """A config dataclass as {dotted key: value}, what every tracker takes as hyper-parameters: nested
    sections and dicts become dotted keys, lists their JSON text."""
    return dict(_flatten("", to_dict(config)))


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, bool | int | float | str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(f"{prefix}{key}.", item)
    elif isinstance(value, bool | int | float | str):
        yield prefix[:-1], value
    else:
        yield prefix[:-1], json.dumps(value)


def _complete_lines(path: Path) -> list[str]:
    """The lines of a metrics file up to the first one that is not complete JSON: the one a process
    killed inside a write (or a full disk) left behind, which only ever comes last."""
    lines = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        lines.append(line)
    return lines
