"""metrics.jsonl (one JSON object per logged step) and TensorBoard, written by the main process."""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records; on resume from step s, first drops the records an interrupted run wrote
    after s (and a last line a crash cut short), so the file ends up identical to an uninterrupted run's."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line in _complete_lines(self.path) if json.loads(line)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self.file = self.path.open("a")
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, float) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


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
