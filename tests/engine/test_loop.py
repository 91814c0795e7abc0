"""The shared training loop on a toy regression: when it reads values back to the host, and which
callbacks run on a step fp16's GradScaler skips; train.compile; models whose unused parameters DDP would reject;
and the CPU placement the suite's loops get on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._inductor.config
from accelerate import Accelerator
from accelerate.state import PartialState
from safetensors.torch import load_file
from torch import Tensor, nn

from sslfg.config import ConfigError, load_config
from sslfg.data.loader import EpochBatchSampler, seeded_loader
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.engine.loop import LoopState, compile_modules, run_loop
from sslfg.engine.metrics import MetricsLog
from sslfg.methods import build_method
from sslfg.pretrain import pretrain
from sslfg.schema import FinetuneConfig, LoopConfig, ModelConfig, PretrainConfig
from tests.conftest import TINY_MODEL, tiny_config
from tests.reliability import procs

HOST_READS = (Tensor.tolist, Tensor.item, Tensor.__float__, Tensor.__int__, Tensor.__bool__)


class Traced(Tensor):
    """A loss that records every read back to the host of it or of anything computed from it, with the
    number of optimizer steps started at that moment."""

    steps_started = 0
    reads: list[int] = []

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in HOST_READS:
            cls.reads.append(cls.steps_started)
        return super().__torch_function__(func, types, args, kwargs or {})


class InfGrad(torch.autograd.Function):
    """Identity whose gradient is infinite: a finite loss whose step a GradScaler must skip."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * float("inf")


def toy_run(tmp_path: Path, steps: int, loss_of_step: Callable[[int, Tensor], Tensor],
            accelerator: Accelerator | None = None, **train: int) -> tuple:
    """A linear regression through run_loop: 4 samples a batch, `steps` steps; loss_of_step(i, loss)
    may replace the loss of step i. Returns the loop's arguments to run it with callbacks."""
    accelerator = accelerator or make_accelerator()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, generator=g), torch.randn(1, generator=g)) for _ in range(4 * steps)]
    sampler = EpochBatchSampler(len(data), 4)
    model = accelerator.prepare(nn.Linear(3, 1))
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    calls = []

    def compute_loss(batch: list[Tensor]) -> dict[str, Tensor]:
        x, y = batch
        loss = loss_of_step(len(calls), ((model(x) - y) ** 2).mean())
        calls.append(1)
        return {"loss": loss}

    cfg = LoopConfig(epochs=1, batch_size=4, **train)
    state = LoopState(schedules={"lr": np.full(steps, 0.1), "weight_decay": np.zeros(steps)})
    log = MetricsLog(tmp_path, accelerator.is_main_process)
    return (accelerator, model, optimizer, seeded_loader(data, sampler, 0), sampler, cfg, state, tmp_path, log,
            compute_loss)


def test_host_reads_only_at_log_and_checkpoint_steps(tmp_path: Path) -> None:
    """No host sync per step: the loss (and all computed from it: the finite check, the logged values) is
    read only at the steps that log (every 4) or checkpoint (every 5), here 4, 5, 8, 10 and 12 of 12."""
    Traced.reads = []

    def traced(i: int, loss: Tensor) -> Tensor:
        Traced.steps_started = i + 1
        return loss.as_subclass(Traced)

    run_loop(*toy_run(tmp_path, 12, traced, log_every=4, checkpoint_every=5))
    assert Traced.reads, "the loss was never read back: the test would prove nothing"
    assert sorted(set(Traced.reads)) == [4, 5, 8, 10, 12]


def test_skipped_step_is_told_to_the_update_callback_and_evaluation_is_not_training_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16's GradScaler skips step 2 (infinite gradients): after_update learns it (the EMA does not run for it),
    evaluate (the online kNN) runs for every step, the weights really stayed as they were, and the time spent
    evaluating is not counted as training time."""
    accelerator = make_accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what accelerate builds for fp16 on a GPU
    args = toy_run(tmp_path, 5, lambda i, loss: InfGrad.apply(loss) if i == 2 else loss, accelerator)
    model, state = args[1], args[6]
    updates, steps, weights = [], [], []
    clock = [0.0]  # the loop's clock, which only evaluating advances
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def evaluate(s: int) -> None:
        steps.append(s)
        weights.append(model.weight.detach().clone())
        clock[0] += 100.0

    run_loop(*args, after_update=lambda s, applied: updates.append((s, applied)), evaluate=evaluate)
    assert steps == [0, 1, 2, 3, 4]
    assert updates == [(0, True), (1, True), (2, False), (3, True), (4, True)]
    assert torch.equal(weights[2], weights[1]) and not torch.equal(weights[3], weights[2])
    assert state.seconds == 0.0  # the 500 s of evaluation are not training time
    assert accelerator.scaler.get_scale() == pytest.approx(2.0**16 / 2)  # one overflow halves the scale


def test_suite_trains_on_the_cpu_where_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA reported present, an in-process accelerator of the suite is on the CPU (tests/conftest.py),
    and the subprocesses the reliability helpers start (also under `accelerate launch`) see no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    PartialState._reset_state()  # a process-wide singleton: pick the device afresh, as a first test would
    try:
        assert make_accelerator().device.type == "cpu"
    finally:
        PartialState._reset_state()
    probe = "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"
    out = subprocess.run([sys.executable, "-c", probe], env=procs.ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "''"  # what CUDA reads as: no device


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_global_pool_that_leaves_parameters_unused_is_refused(pool: str) -> None:
    """timm's avg/map pooling adds parameters that a step never reaches (sslfg reads the CLS token), which DDP
    rejects: the recipe is refused naming the key; the pooling the schema accepts leaves none unused."""
    for schema in (PretrainConfig, FinetuneConfig):
        with pytest.raises(ConfigError, match=rf"model.kwargs = .*global_pool.*DDP.*remove global_pool \('{pool}'\)"):
            load_config(None, [f"model.kwargs={{global_pool: {pool}}}"], schema)
    load_config(None, ["model.kwargs={global_pool: token}"], PretrainConfig)

    def unused(global_pool: str) -> list[str]:
        cfg = ModelConfig(**{**TINY_MODEL, "kwargs": {**TINY_MODEL["kwargs"], "global_pool": global_pool}})
        model = build_method(cfg, PretrainConfig().method, 16)
        model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))["loss"].backward()
        return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]

    assert unused("token") == []
    left_out = unused(pool)
    assert left_out and all(n.split(".")[1] in ("fc_norm", "attn_pool") for n in left_out), left_out


def test_compile_without_a_cpp_compiler_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, inductor needs a C++ compiler: without one (here: its search list names none that exists),
    train.compile is one error naming the key and both ways out, before any step."""
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/g++"))
    with pytest.raises(ConfigError, match=r"train.compile: .*no C\+\+ compiler.*apt-get install g\+\+.*compile=false"):
        compile_modules([nn.Linear(2, 2)], torch.device("cpu"))


@pytest.mark.slow  # inductor builds C++ kernels: ~20 s on 2 cores
def test_compiled_pretraining_equals_eager(tiny_data: Path, tmp_path: Path) -> None:
    """train.compile: true gives eager's losses (relative 1e-4) and weights after 3 CPU steps: the compiled
    kernels reorder float sums, nothing more. AdamW moves a weight by about lr a step whatever its gradient's
    size, so a near-zero gradient whose sign the reordering flips costs up to 2·lr a step: weights agree to
    2·3·lr (3e-5 here), far below a real difference."""
    runs = [tmp_path / "eager", tmp_path / "compiled"]
    for run, compiled in zip(runs, (False, True), strict=True):
        pretrain(tiny_config(tiny_data, run, max_steps=3, figure_samples=0, compile=compiled))
    eager, compiled = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs)
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "loss_global", "loss_local"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (b["step"], key)
    weights = [load_file(str(checkpoint_dirs(run)[-1] / "model.safetensors")) for run in runs]
    assert weights[0].keys() == weights[1].keys()  # compiled in place: checkpoints keep their keys
    atol = 2 * 3 * max(r["lr"] for r in eager)
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
