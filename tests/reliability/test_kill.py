"""Case 1: `kill -9` at a random step, then `resume=auto`, ends bitwise equal to an uninterrupted run
(weights incl. the momentum encoder, optimizer state, metrics.jsonl), for pretraining and fine-tuning.
The step is drawn from SSLFG_TEST_SEED (random when unset); assertion messages name seed and step.

Case 2: a SIGKILL while accelerate.save_state is writing a checkpoint. The previous checkpoint still
loads, `resume=auto` continues from it and says so, the half-written folder is never taken for a
checkpoint and is removed by the next successful save, and the run still ends as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslfg.engine.checkpoint import STATE_FILE, checkpoint_dirs
from sslfg.engine.metrics import MetricsLog
from tests.reliability.procs import (
    TIMEOUT,
    Reference,
    assert_same_run,
    command,
    finetuning,
    finish,
    kill_after_step,
    pretraining,
    start,
)

SEED = int(os.environ.get("SSLFG_TEST_SEED", random.randrange(1_000_000)))
TOTAL = 12  # 24 images, batch 4, 2 epochs


@pytest.fixture(scope="module")
def straight_pretraining(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """The uninterrupted pretraining both kill cases compare with, running beside them."""
    out = tmp_path_factory.mktemp("straight") / "run"
    reference = Reference(command(pretraining(tiny_data, out)), out)
    yield reference
    reference.stop()


def kill_and_resume(cmd: Callable[[Path], list[str]], reference: Reference, tmp_path: Path, name: str) -> Path:
    rng = random.Random(f"{SEED}-{name}")
    step, delay = rng.randint(1, TOTAL - 3), rng.uniform(0.0, 0.03)  # >= 2 steps left to be killed in
    why = f"{name}: SSLFG_TEST_SEED={SEED}, killed {delay * 1000:.0f} ms after step {step} was logged"
    run = tmp_path / "killed"
    kill_after_step(command(cmd(run)), run, step, delay)
    assert not (run / "summary.json").exists() and not (run / "metrics.json").exists(), why
    before = checkpoint_dirs(run)
    output = finish(start(command([*cmd(run), "resume=auto"])))
    if before:  # the user is told which checkpoint the run continues from
        assert f"resuming from {before[-1]} (step {int(before[-1].name[5:])})" in output, why
    else:
        assert "resuming" not in output, why
    assert_same_run(reference.wait(), run, why)
    assert checkpoint_dirs(run)[-1].name == f"step_{TOTAL:08d}", why
    assert not list((run / "checkpoints").glob(".tmp-*")), why
    return run


def test_pretraining_killed_at_a_random_step_resumes_exactly(tiny_data: Path, tmp_path: Path,
                                                             straight_pretraining: Reference) -> None:
    run = kill_and_resume(lambda out: pretraining(tiny_data, out), straight_pretraining, tmp_path, "pretraining")
    assert json.loads((run / "summary.json").read_text())["step"] == TOTAL


def test_finetuning_killed_at_a_random_step_resumes_exactly(tiny_data: Path, tmp_path: Path) -> None:
    reference = Reference(command(finetuning(tiny_data, tmp_path / "straight")), tmp_path / "straight")
    run = kill_and_resume(lambda out: finetuning(tiny_data, out), reference, tmp_path, "fine-tuning")
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (reference.wait(), run))
    assert {k: v for k, v in a.items() if k.startswith("test.")} == {k: v for k, v in b.items()
                                                                       if k.startswith("test.")}


# train_ssl.py whose 2nd checkpoint dies inside save_state: the model file is complete, half of the
# optimizer file is on disk, then the process SIGKILLs itself.
DIE_IN_SECOND_SAVE = """
import io, os, runpy, signal, sys
import accelerate, accelerate.checkpointing, torch
save_state, save = accelerate.Accelerator.save_state, accelerate.checkpointing.save
calls = []

def dying_save(obj, f, *args, **kwargs):
    if str(f).endswith("optimizer.bin"):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with open(f, "wb") as file:
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)

def counting_save_state(self, *args, **kwargs):
    calls.append(1)
    accelerate.checkpointing.save = dying_save if len(calls) == 2 else save
    return save_state(self, *args, **kwargs)

accelerate.Accelerator.save_state = counting_save_state
sys.argv = ["train_ssl.py", *sys.argv[1:]]
runpy.run_path("train_ssl.py", run_name="__main__")
"""


def test_kill_inside_a_checkpoint_write(tiny_data: Path, tmp_path: Path, straight_pretraining: Reference) -> None:
    run = tmp_path / "run"
    killed = start(command(["-c", DIE_IN_SECOND_SAVE, *pretraining(tiny_data, run)[1:]]))
    _, err = killed.communicate(timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]

    partial = run / "checkpoints" / ".tmp-step_00000002"
    assert (partial / "model.safetensors").is_file() and (partial / "optimizer.bin").is_file()
    assert not (partial / STATE_FILE).exists()
    with pytest.raises(Exception):  # noqa: B017 - really half a file
        torch.load(partial / "optimizer.bin", weights_only=True)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000001"], "the half-written folder counts"

    previous = checkpoint_dirs(run)[-1]  # still loads, file by file
    state = json.loads((previous / STATE_FILE).read_text())
    assert state["step"] == 1 and state["files"]["optimizer.bin"] == (previous / "optimizer.bin").stat().st_size
    assert any(k.startswith("momentum_encoder.") for k in load_file(str(previous / "model.safetensors")))
    assert torch.load(previous / "optimizer.bin", weights_only=True)["state"]

    # Resume through the command line, checkpointing at other steps: this run never rewrites
    # .tmp-step_00000002, so only the cleanup can remove it.
    output = finish(start(command([*pretraining(tiny_data, run, checkpoint_every=5), "resume=auto"])))
    assert f"resuming from {previous} (step 1)" in output, output[-3000:]
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000010", "step_00000012"]
    assert not list((run / "checkpoints").glob(".tmp-*")), "the half-written checkpoint was left behind"
    assert_same_run(straight_pretraining.wait(), run, "killed inside save_state at step 2, resumed from step 1")


@pytest.mark.parametrize("tail", ['{"step": 5, "lo', '{"step": 5, "loss": 1.0}\n{"st'])
def test_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path: Path, tail: str) -> None:
    """A kill (or a full disk) inside a write leaves half a JSON line; resume must not choke on it."""
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    log = MetricsLog(tmp_path, enabled=True, resume_step=2)
    log.log(3, {"loss": 2.0})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 3, "loss": 2.0}]
