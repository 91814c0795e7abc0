"""Helpers of the reliability suite: real command-line runs in subprocesses (one process or two gloo
processes), a SIGKILL at a chosen logged step, and the final state of a run to compare bitwise."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from sslfg.engine.checkpoint import checkpoint_dirs
from tests.conftest import TINY_HEADS

ROOT = Path(__file__).resolve().parents[2]
# On the CPU even where CUDA exists: two processes would need two GPUs, and bitwise resume CPU kernels.
# `accelerate launch` resets ACCELERATE_USE_CPU for its workers, so CUDA is hidden from them instead.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
TIMEOUT = 300


def pretrain_args(data: Path, out: Path, batch: int = 8, **extra: object) -> list[str]:
    """train_ssl.py key=value overrides of a tiny LoDisc run (24 images, batch 8: 3 steps an epoch); tiny heads
    for every method, so `method.name=...` in `extra` trains any of them."""
    args = {
        "data.root": data, "data.image_size": 16, "data.num_workers": 0, "data.train_split": "train",
        "model.name": "vit_tiny_patch16_224", "model.patch_size": 4,
        "model.kwargs": "{embed_dim: 32, depth: 2, num_heads: 2}", **TINY_HEADS, "train.epochs": 2,
        "train.checkpoint_every": 100, "train.figure_samples": 0,
        "train.log_every": 1, "train.batch_size": batch, "output_dir": out, **extra,
    }
    return [f"{key}={value}" for key, value in args.items()]


def finetune_args(data: Path, out: Path, batch: int = 8, **extra: object) -> list[str]:
    """eval.finetune key=value overrides of a tiny GLSim fine-tune (as tests/test_finetune.py ft_config)."""
    args = {
        "data.root": data, "data.image_size": 16, "data.num_workers": 0, "data.train_split": "train",
        "data.num_classes": 3, "model.name": "vit_tiny_patch16_224", "model.patch_size": 4,
        "model.kwargs": "{embed_dim: 32, depth: 2, num_heads: 2}", "model.top_k": 3, "train.epochs": 2,
        "train.batch_size": batch, "train.lr": 0.05, "train.warmup_steps": 0, "train.checkpoint_every": 100,
        "train.log_every": 1, "output_dir": out, **extra,
    }
    return [f"{key}={value}" for key, value in args.items()]


def pretraining(data: Path, out: Path, checkpoint_every: int = 1, **extra: object) -> list[str]:
    """train_ssl.py and its arguments: the tiny run at batch 4 (12 steps on one process)."""
    return ["train_ssl.py", *pretrain_args(data, out, batch=4, **{"train.checkpoint_every": checkpoint_every},
                                           **extra)]


def finetuning(data: Path, out: Path, checkpoint_every: int = 1, **extra: object) -> list[str]:
    """-m eval.finetune and its arguments: the tiny fine-tune at batch 4 (12 steps on one process)."""
    return ["-m", "eval.finetune", *finetune_args(data, out, batch=4, **{"train.checkpoint_every": checkpoint_every},
                                                  **extra)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(entry: list[str], processes: int = 1) -> list[str]:
    """`entry` (["train_ssl.py"] or ["-m", "eval.knn"]) under python, or under `accelerate launch`
    with `processes` gloo processes on a free port (other test runs may use the default one)."""
    if processes == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *entry]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """Waits for a started command, asserts it succeeded; returns its stdout + stderr."""
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{err[-3000:]}"
    return out + err


def run_all(*cmds: list[str]) -> list[str]:
    """Runs the commands side by side (2 cores: their start-up overlaps); outputs in order."""
    procs = [start(cmd) for cmd in cmds]
    return [finish(p) for p in procs]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    """Returns once `proc` logged `step` to run/metrics.jsonl (or ended, or TIMEOUT passed)."""
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and step not in logged_steps(run) and time.monotonic() < deadline:
        time.sleep(0.002)


def kill_after_step(cmd: list[str], run: Path, step: int, delay: float = 0.0) -> subprocess.Popen:
    """Starts `cmd` and sends SIGKILL `delay` seconds after it logged `step` to run/metrics.jsonl."""
    proc = start(cmd)
    wait_for_step(proc, run, step)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was to be killed after step {step} but ended with {proc.returncode}:\n{err[-3000:]}")
    return proc


def workers(launcher: subprocess.Popen, n: int = 2) -> list[int]:
    """The pids of the `n` processes `accelerate launch` started, once they all run."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        if len(children) == n:
            return [int(pid) for pid in children]
        time.sleep(0.05)
    raise AssertionError(f"{launcher.args} never started its worker processes")


class Reference:
    """An uninterrupted run started in the background; `wait()` returns its directory once it is done."""

    def __init__(self, cmd: list[str], out: Path) -> None:
        self.proc, self.out = start(cmd), out

    def wait(self) -> Path:
        if self.proc.returncode is None:
            finish(self.proc)
        return self.out

    def stop(self) -> None:
        """Ends it if a failed test left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def final_state(run: Path) -> tuple[dict, dict, list[dict]]:
    """Newest checkpoint's weights and optimizer state, and every metrics record."""
    ckpt = checkpoint_dirs(run)[-1]
    model = load_file(str(ckpt / "model.safetensors"))
    optim = torch.load(ckpt / "optimizer.bin", weights_only=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return model, optim, metrics


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for sa, sb in zip(a["state"].values(), b["state"].values(), strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_same_run(a: Path, b: Path, why: str = "") -> None:
    """Bitwise: last checkpoint's weights (incl. any EMA encoder) and optimizer, and metrics.jsonl."""
    model_a, optim_a, metrics_a = final_state(a)
    model_b, optim_b, metrics_b = final_state(b)
    assert [p.name for p in checkpoint_dirs(a)][-1:] == [p.name for p in checkpoint_dirs(b)][-1:], why
    assert model_a.keys() == model_b.keys(), why
    different = [k for k in model_a if not torch.equal(model_a[k], model_b[k])]
    assert not different, f"{why}: weights differ: {different[:5]}"
    assert_same_optimizer(optim_a, optim_b)
    assert metrics_a == metrics_b, why
