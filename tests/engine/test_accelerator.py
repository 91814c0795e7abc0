"""make_accelerator's process-group timeout, for real on two gloo processes: rank 0 works alone (as the
main process does in kNN, retrieval and t-SNE) while rank 1 waits at a barrier; the evaluation commands
ask for the long one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sslfg.commands import knn
from sslfg.engine.accelerator import make_accelerator
from sslfg.evaluation import run as evaluation_run
from tests.reliability.procs import ENV, ROOT, command
from tests.test_eval_knn import TINY, data_args

WORKER = """
import sys, time
import torch.distributed as dist
from sslfg.commands import knn
from sslfg.evaluation import run as evaluation_run
from sslfg.engine.accelerator import make_accelerator
acc = make_accelerator(timeout_s=float(sys.argv[1]))
if acc.is_main_process:
    time.sleep(6)  # longer than the short timeout below
dist.barrier()
print("barrier passed", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("timeout_s, ok", [(2, False), (120, True)])
def test_timeout_bounds_the_wait_at_a_barrier(tmp_path: Path, timeout_s: int, ok: bool) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run(command([str(script), str(timeout_s)], processes=2), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr[-2000:]
    if ok:
        assert done.stdout.count("barrier passed") == 2
    else:  # rank 1 gave up after the given timeout, not torch's default
        assert f"Timed out waiting {timeout_s * 1000}ms" in done.stderr


def test_evaluation_commands_ask_for_the_long_timeout(monkeypatch: pytest.MonkeyPatch, tiny_data: Path) -> None:
    asked: list[float] = []

    def recording(*args: object, timeout_s: float = 0, **kwargs: object) -> object:
        asked.append(timeout_s)
        return make_accelerator(*args, timeout_s=timeout_s, **kwargs)

    monkeypatch.setattr(evaluation_run, "make_accelerator", recording)
    knn.main(["--random-init", "--model", "vit_tiny_patch16_224", *TINY, *data_args(tiny_data), "--check"])
    assert asked == [evaluation_run.EVAL_TIMEOUT_S] and evaluation_run.EVAL_TIMEOUT_S >= 3600
