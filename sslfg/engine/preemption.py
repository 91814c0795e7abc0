"""Stopping a training run on a signal: at a step every process agrees on, with a checkpoint.

SIGTERM (Slurm, spot instances, `kill`), SIGUSR1 (Slurm's `--signal=USR1@T`) and SIGINT (Ctrl-C)
only set a flag while the training loop runs; the loop finishes the optimizer step in flight,
writes a checkpoint (atomically, like every checkpoint) and raises `Interrupted`, which the command
line turns into a message naming the checkpoint and the `resume=auto` command, and the exit status
128 + signal number (143, 138, 130): what a shell reports for a process ended by that signal.

One process reads its flag after every step. Several processes must stop at the same step, so they
OR their flags with an all-reduce, which on GPUs is a host sync: only every `train.stop_check_every`
steps, so a loop without any per-step host sync stays possible. The stop then comes within that many
steps; under `accelerate launch` the launcher relays SIGTERM/SIGINT and kills the workers 30 s later.
"""

from __future__ import annotations

import logging
import shlex
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

import torch
import torch.distributed as dist
from accelerate import Accelerator

from sslfg.distributed import world_size
from sslfg.entrypoints import command_words

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPTED = ("interrupted (Ctrl-C) outside a training loop; every checkpoint on disk is complete: rerun the "
               "command (with resume=auto, or linear.resume=auto for eval.linear, a run continues from its newest)")


class Interrupted(Exception):
    """A run stopped by signal `signum` after writing `checkpoint` at `step`; `resume_key=auto` continues
    it ('': rerunning the same command does, as for a study)."""

    def __init__(self, signum: int, step: int, checkpoint: Path, resume_key: str, is_main: bool = True,
                 where: str = "") -> None:
        self.signum, self.step, self.checkpoint, self.resume_key, self.is_main = (
            signum, step, checkpoint, resume_key, is_main)
        super().__init__(f"{where}stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint: {checkpoint}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While active, the stop signals are recorded instead of ending the process (main thread only:
    Python delivers signals there). `requested(accelerator, step)` says whether to stop after `step`."""

    def __init__(self, check_every: int) -> None:
        self.check_every, self.received = check_every, 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if isinstance(error, Interrupted):  # the run is over and exits cleanly: a repeated Ctrl-C (or the SIGTERM
            for s in STOP_SIGNALS:         # a launcher relays to workers still exiting) must not cut its exit short
                signal.signal(s, signal.SIG_IGN)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            log.warning("%s received: already stopping", signal.Signals(signum).name)
            return
        self.received = signum
        log.warning("%s received: stopping after the current optimizer step and writing a checkpoint "
                    "(a SIGKILL now loses only the steps since the last complete checkpoint)",
                    signal.Signals(signum).name)

    def requested(self, accelerator: Accelerator, step: int) -> int:
        """The signal to stop on after `step` (0: go on), the same on every process."""
        if accelerator.num_processes == 1:
            return self.received
        if step % self.check_every:
            return 0
        flag = torch.tensor([self.received], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def continue_command(argv: Sequence[str], resume_key: str) -> str:
    """The command line of this process with `resume_key=auto` in place of any value it had ('': as is).
    It ran as `python -m X`, `python X.py` or an installed console command: a script without .py (e.g.
    .venv/bin/sslfg-pretrain), given by its name, which `accelerate launch --no_python` runs too."""
    command = command_words()
    processes = world_size()
    if processes > 1:  # accelerate runs python itself, or a console command with --no_python
        console = command[0] != "python"
        command = ["accelerate", "launch", *(["--no_python"] if console else []), "--multi_gpu", "--num_processes",
                   str(processes), *(command if console else command[1:])]
    args = [a for a in argv if not (resume_key and a.startswith(f"{resume_key}="))]
    return shlex.join([*command, *args, *([f"{resume_key}=auto"] if resume_key else [])])


def stop_message(error: Interrupted, argv: Sequence[str]) -> str:
    """What the command line prints for a run stopped by a signal."""
    return f"{error}\ncontinue with: {continue_command(argv, error.resume_key)}"
