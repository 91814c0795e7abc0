"""Case 10: preemption and Ctrl-C. SIGTERM, SIGUSR1 or SIGINT reaches a real train_ssl.py / eval.finetune
process after a logged step: the run finishes the step in flight, writes a checkpoint at that step, prints
it and the command that continues it, and exits with 128 + the signal number, without a traceback. The
printed command, run as printed, ends bitwise equal to an uninterrupted run.

Two gloo processes stop at the same step, a multiple of train.stop_check_every, whether one worker alone
is signalled or the launcher relays the signal (Ctrl-C in a terminal reaches only the launcher). The study
runner stops with the arm's status and continues that arm from its checkpoint when rerun.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sslfg.cli import run_cli
from sslfg.config import load_config
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.engine.preemption import INTERRUPTED, Interrupted
from sslfg.schema import StudyConfig
from sslfg.study.layout import done_path, pretrain_dir
from sslfg.study.run import Study
from tests.reliability.procs import (
    TIMEOUT,
    Reference,
    assert_same_run,
    command,
    finetuning,
    finish,
    logged_steps,
    pretraining,
    start,
    wait_for_step,
    workers,
)
from tests.test_study import write_recipes

SIGNALLED_AFTER = 3  # the logged step after which the signal is sent
TOTAL = 12  # one process: 24 images, batch 4, 2 epochs; two processes: batch 4 each, 4 epochs
CHECK_EVERY = 4  # train.stop_check_every of the two-process runs
OUR_FRAME = re.compile(r'File "[^"]*(/sslfg/|/eval/|train_ssl\.py")')  # a traceback line in our code

Entry = Callable[..., list[str]]


def run_name(entry: Entry) -> str:
    return "pretraining" if entry is pretraining else "fine-tuning"


@pytest.fixture(scope="module")
def straight_pretraining(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    """The uninterrupted one-process pretraining, running beside the cases that compare with it."""
    out = tmp_path_factory.mktemp("straight") / "run"
    reference = Reference(command(pretraining(tiny_data, out, checkpoint_every=5)), out)
    yield reference
    reference.stop()


def signal_after_step(cmd: list[str], run: Path, signum: int, targets: Callable[[subprocess.Popen], list[int]]
                      ) -> tuple[int, str]:
    """Starts `cmd`, sends `signum` to `targets(process)` once run/metrics.jsonl has SIGNALLED_AFTER;
    returns the exit status and stderr."""
    proc = start(cmd)
    pids = targets(proc)
    wait_for_step(proc, run, SIGNALLED_AFTER)
    assert proc.poll() is None, f"the run ended before step {SIGNALLED_AFTER}:\n{proc.communicate()[1][-3000:]}"
    for pid in pids:
        os.kill(pid, signum)
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def check_stop(err: str, run: Path, signum: int, launch: list[str], args: list[str]) -> tuple[Path, list[str]]:
    """The printed checkpoint is complete, the newest, at the last logged step, and nothing is half-written;
    returns it and the printed command, whose launcher and arguments are `launch` + `args` + resume=auto."""
    assert not OUR_FRAME.search(err), err[-3000:]
    found = re.search(rf"stopped by {signal.Signals(signum).name} after step (\d+); checkpoint: (\S+)\n"
                      r"continue with: (.+)\n", err)
    assert found, err[-3000:]
    step, checkpoint, printed = int(found[1]), Path(found[2]), shlex.split(found[3])
    assert checkpoint == checkpoint_dirs(run)[-1] == run / "checkpoints" / f"step_{step:08d}"
    assert logged_steps(run)[-1] == step, "the checkpoint is not at the step the run reached"
    assert not list((run / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left"
    assert not (run / "summary.json").exists() and not (run / "metrics.json").exists()
    assert printed == [*launch, *args, "resume=auto"]
    return checkpoint, printed


@pytest.mark.parametrize("entry, signum", [(pretraining, signal.SIGTERM), (pretraining, signal.SIGINT),
                                           (finetuning, signal.SIGUSR1)], ids=["pretraining-SIGTERM",
                                                                               "pretraining-SIGINT",
                                                                               "fine-tuning-SIGUSR1"])
def test_one_process_stops_after_the_step_with_a_checkpoint(entry: Entry, signum: int, tiny_data: Path,
                                                            tmp_path: Path, straight_pretraining: Reference) -> None:
    reference = straight_pretraining if entry is pretraining else Reference(
        command(finetuning(tiny_data, tmp_path / "straight", checkpoint_every=5)), tmp_path / "straight")
    run = tmp_path / "stopped"
    cmd = entry(tiny_data, run, checkpoint_every=5)  # the stop's checkpoint is not one of the regular ones
    status, err = signal_after_step(command(cmd), run, signum, lambda proc: [proc.pid])
    assert status == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    checkpoint, printed = check_stop(err, run, signum, ["python"], cmd)
    step = int(checkpoint.name[5:])
    assert SIGNALLED_AFTER <= step <= SIGNALLED_AFTER + 1, "more than the step in flight was trained"

    output = finish(start([sys.executable, *printed[1:]]))  # the command as printed
    assert f"resuming from {checkpoint} (step {step})" in output
    assert_same_run(reference.wait(), run, f"{run_name(entry)} stopped by {signal.Signals(signum).name}")
    if entry is finetuning:
        a, b = (json.loads((r / "metrics.json").read_text()) for r in (reference.wait(), run))
        assert {k: v for k, v in a.items() if k.startswith("test.")} == {k: v for k, v in b.items()
                                                                           if k.startswith("test.")}


@pytest.mark.parametrize("entry, signum, who", [(pretraining, signal.SIGTERM, "one worker"),
                                                (finetuning, signal.SIGINT, "the launcher")],
                         ids=["pretraining-SIGTERM-one-worker", "fine-tuning-SIGINT-launcher"])
def test_two_processes_stop_at_the_same_step(entry: Entry, signum: int, who: str, tiny_data: Path,
                                             tmp_path: Path) -> None:
    def args(out: Path, checkpoint_every: int) -> list[str]:
        return entry(tiny_data, out, checkpoint_every, **{"train.epochs": 4, "train.stop_check_every": CHECK_EVERY})

    reference = Reference(command(args(tmp_path / "straight", 5), processes=2), tmp_path / "straight")
    run = tmp_path / "stopped"
    targets = (lambda proc: workers(proc)[:1]) if who == "one worker" else (lambda proc: [proc.pid])
    status, err = signal_after_step(command(args(run, 5), processes=2), run, signum, targets)
    assert status == 1, err[-3000:]  # the launcher's own status: it reports the workers' below
    if who == "one worker":
        statuses = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: (-?\d+)", err))
        assert statuses == {"0": str(128 + signum), "1": str(128 + signum)}, err[-3000:]
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    checkpoint, printed = check_stop(err, run, signum, launch, args(run, 5))
    step = int(checkpoint.name[5:])
    assert step % CHECK_EVERY == 0 and SIGNALLED_AFTER < step < 3 * CHECK_EVERY, step
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                         "random_states_1.pkl"}

    output = finish(start(command(printed[len(launch):], processes=2)))  # on a free port
    assert f"resuming from {checkpoint} (step {step})" in output
    assert_same_run(reference.wait(), run, f"{run_name(entry)} on 2 processes, {who} got a signal")


def test_cli_reports_a_stop_and_ctrl_c_outside_the_loop(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "step_00000007"

    def stopped(argv: list[str]) -> None:
        raise Interrupted(signal.SIGUSR1, 7, checkpoint, "linear.resume")

    def ctrl_c(argv: list[str]) -> None:
        raise KeyboardInterrupt

    assert run_cli(stopped, ["--checkpoint", "runs/x", "linear.resume=runs/y", "linear.mode=full"]) == 138
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"stopped by SIGUSR1 after step 7; checkpoint: {checkpoint}"
    assert err[1].startswith("continue with: python ")
    assert err[1].endswith(" --checkpoint runs/x linear.mode=full linear.resume=auto")
    assert run_cli(ctrl_c, []) == 130
    assert capsys.readouterr().err == f"error: {INTERRUPTED}\n"


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """A stop leaves SIGTERM ignored (the process is to exit): give pytest its handlers back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_study_arm_stopped_by_a_signal_continues_on_rerun(tiny_data: Path, tmp_path: Path,
                                                         restore_signals: None) -> None:
    """In this process: a real SIGUSR1 to the study's first pretraining arm; run_arm passes the stop on
    with the study's own command to continue, and running the arm again resumes from its checkpoint."""
    config = write_recipes(tiny_data, tmp_path, seeds=[0], finetune_arms=False)
    study = Study(load_config(config, [], StudyConfig))
    arm = study.pretrain_arms(0, epochs=2)[0]
    run = pretrain_dir(study.root, 0, "mocov3")

    def send_after_step_1() -> None:
        deadline = time.monotonic() + TIMEOUT
        while 1 not in logged_steps(run) and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send_after_step_1, daemon=True).start()
    with pytest.raises(Interrupted, match=rf"^study arm {arm.id}: stopped by SIGUSR1 after step") as stop:
        study.run_arm(arm)
    assert stop.value.resume_key == "" and stop.value.exit_status == 138
    assert stop.value.checkpoint == checkpoint_dirs(run)[-1] and not done_path(study.root, arm.id).exists()

    study.run_arm(arm)
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    assert done_path(study.root, arm.id).is_file()
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_study_process_stopped_by_sigterm_continues_where_it_stopped(tiny_data: Path, tmp_path: Path) -> None:
    config = write_recipes(tiny_data, tmp_path, seeds=[0], finetune_arms=False)
    root = tmp_path / "study"
    run = pretrain_dir(root, 0, "lodisc")  # the second arm: the first one is done by then
    cmd = ["-m", "sslfg.study", "--config", str(config), "evaluate.run_linear=false"]
    proc = start(command(cmd))
    wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    checkpoint = checkpoint_dirs(run)[-1]
    assert f"study arm seed0.pretrain.lodisc: stopped by SIGTERM after step {checkpoint.name[5:].lstrip('0')}" in err
    assert f"continue with: python -m sslfg.study {shlex.join(cmd[2:])}\n" in err
    first = done_path(root, "seed0.pretrain.mocov3")
    done_before = first.read_text()

    output = finish(start(command(cmd)))
    assert f"resuming from {checkpoint}" in output and "seed0.pretrain.mocov3 finished earlier, skipped" in output
    assert first.read_text() == done_before and (root / "report" / "report.md").is_file()
