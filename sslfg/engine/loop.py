"""The training loop shared by pretraining and fine-tuning, readable top to bottom.

Gradient accumulation, clipping and mixed precision come from Accelerate; the lr, weight decay
and any other schedule are arrays indexed by the global optimizer step; a checkpoint every
`checkpoint_every` steps can be resumed mid-epoch exactly. SIGTERM, SIGUSR1 and SIGINT end the
loop after a step, with a checkpoint (`sslfg.engine.preemption`).

No host sync per step: the losses stay on the device and are read back (one reduce, one copy) only
at `log_every` steps and before each checkpoint. A non-finite loss is recorded on the device as the
first bad step (`NonFiniteWatch`) and checked at those read-backs, so no checkpoint after it is ever
written and the error still names the step where it happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from sslfg.config import ConfigError
from sslfg.data.loader import EpochBatchSampler
from sslfg.engine.checkpoint import checkpoint_dirs, save_checkpoint
from sslfg.engine.metrics import MetricsLog
from sslfg.engine.preemption import Interrupted, StopSignals
from sslfg.schema import LoopConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no checkpoint from that step on was saved (the steps after it that
    ran before the check exist only in memory)."""


NO_STEP = torch.iinfo(torch.int64).max


class NonFiniteWatch:
    """The first optimizer step whose loss was not finite, and that loss, kept on the device: `see` is
    asynchronous, `first` (a collective on several processes) reads it back."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((1,), NO_STEP, dtype=torch.int64, device=device)
        self.loss = torch.zeros(1, device=device)

    def see(self, step: int, loss: Tensor) -> None:
        loss = loss.detach().float().reshape(1)
        first = ~torch.isfinite(loss) & (self.step == NO_STEP)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss, self.loss)

    def first(self, accelerator: Accelerator) -> tuple[int, float] | None:
        """(step, loss) of the earliest non-finite loss on any process, or None."""
        steps, losses = accelerator.gather((self.step, self.loss))
        i = int(steps.argmin())
        step = int(steps[i])
        return None if step == NO_STEP else (step, float(losses[i]))


@dataclass
class LoopState:
    """What the loop needs besides the model: where it starts and what it schedules."""

    schedules: dict[str, np.ndarray]  # "lr", "weight_decay", and any other per-step value
    start_step: int = 0
    lr_key: str = "train.base_lr"  # the keys a non-finite loss error tells the user to change
    resume_key: str = "resume"
    images_seen: int = 0  # all processes together, since step 0 (a resumed run: from its checkpoint)
    seconds: float | None = 0.0  # training time since step 0; None: unknown (resumed from a checkpoint without it)

    def progress(self, running: float) -> dict[str, float]:
        """What a checkpoint keeps of the loop, `running` seconds into the current segment ({}: unknown)."""
        return {} if self.seconds is None else {"seconds": round(self.seconds + running, 3),
                                                "images_seen": self.images_seen}

    def timing(self) -> dict[str, float | None]:
        """Training seconds and throughput of the whole run so far (None when unknown)."""
        if self.seconds is None:
            return {"seconds": None, "images_per_second": None}
        return {"seconds": round(self.seconds, 2),
                "images_per_second": round(self.images_seen / max(self.seconds, 1e-9), 1)}


def compile_modules(modules: Iterable[torch.nn.Module], device: torch.device) -> None:
    """`train.compile`: torch.compile each module in place (state-dict keys, hence checkpoints, stay as they are).
    On the CPU inductor builds C++ kernels: without a C++ compiler that is a ConfigError now, not a traceback at
    the first step."""
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler  # heavy: only when asked for

        try:
            get_cpp_compiler()
        except Exception as e:  # inductor's InvalidCxxCompiler, whatever it searched
            raise ConfigError("train.compile: torch.compile on the CPU builds C++ kernels but finds no C++ compiler "
                              "(g++, or $CXX); install one (apt-get install g++) or set train.compile=false") from e
    for module in modules:
        module.compile()


def steps_per_epoch(sampler: EpochBatchSampler, accum: int) -> int:
    return sampler.batches_per_epoch // accum


def run_loop(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Any],
    sampler: EpochBatchSampler,
    train: LoopConfig,
    state: LoopState,
    run_dir: Path,
    log: MetricsLog,
    compute_loss: Callable[[Any], dict[str, Tensor]],
    before_step: Callable[[int], None] | None = None,
    after_update: Callable[[int, bool], None] | None = None,
    evaluate: Callable[[int], None] | None = None,
) -> int:
    """Trains from `state.start_step` to the end of the schedule (or `train.max_steps`).

    compute_loss(batch) returns {"loss": scalar, ...more scalars to log}; before_step(step) runs before each
    forward of that optimizer step (every micro-batch of it); after_update(step, applied) once per optimizer
    step, after it, applied False when fp16's GradScaler skipped it (the EMA runs only after an applied one);
    evaluate(step) last, once per optimizer step (the online kNN): its time is not training time. A parameter
    group's `wd_scale` multiplies the scheduled weight decay, and its parameters keep no gradient while the
    epoch is below its `frozen_epochs`. Returns the last step reached; a stop signal raises `Interrupted` after
    the step in flight and its checkpoint.
    """
    with StopSignals(train.stop_check_every) as signals:
        per_epoch = steps_per_epoch(sampler, train.grad_accum_steps)
        total = len(state.schedules["lr"])
        stop = min(total, train.max_steps) if train.max_steps > 0 else total
        step = state.start_step
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bar = tqdm(total=stop, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True)
        watch = NonFiniteWatch(accelerator.device)
        tic = time.perf_counter()
        while step < stop:
            epoch, batch_in_epoch = divmod(step, per_epoch)
            sampler.set_epoch(epoch, start_batch=batch_in_epoch * train.grad_accum_steps)
            for batch in loader:
                with accelerator.accumulate(model):
                    for group in optimizer.param_groups:
                        group["lr"] = float(state.schedules["lr"][step])
                        wd = float(state.schedules["weight_decay"][step])
                        group["weight_decay"] = wd * group.get("wd_scale", 1.0)
                    if before_step is not None:
                        before_step(step)
                    out = compute_loss(batch)
                    names = sorted(out)
                    values = torch.stack([out[k].detach().float() for k in names])  # stays on the device
                    watch.see(step + 1, out["loss"])  # numbered as metrics.jsonl and checkpoints: steps done
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients and train.clip_grad > 0:
                        clip_gradients(accelerator, optimizer, params, train.clip_grad, train.clip_mode)
                    if accelerator.sync_gradients:
                        drop_frozen_gradients(optimizer, epoch)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.images_seen += _batch_size(batch) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                if after_update is not None:
                    after_update(step, not accelerator.optimizer_step_was_skipped)
                if evaluate is not None:
                    evaluating = time.perf_counter()
                    evaluate(step)
                    tic += time.perf_counter() - evaluating  # evaluating is not training: images/s stay comparable
                step += 1
                signum = signals.requested(accelerator, step)
                log_now = step % train.log_every == 0 or step == stop
                save_now = step % train.checkpoint_every == 0 or step == stop or bool(signum)
                if log_now or save_now:  # the only host reads of the loop
                    _raise_if_non_finite(watch, accelerator, run_dir, state, per_epoch)
                if log_now:
                    logged = dict(zip(names, accelerator.reduce(values, "mean").tolist(), strict=True))
                    scheduled = {k: float(v[step - 1]) for k, v in state.schedules.items()}
                    log.log(step, {"epoch": epoch, **logged, **scheduled})
                    bar.set_postfix(epoch=epoch, loss=f"{logged['loss']:.4f}")
                bar.update(1)
                if save_now:
                    checkpoint = save_checkpoint(accelerator, run_dir, step, train.keep_checkpoints, state.resume_key,
                                                 state.progress(time.perf_counter() - tic))
                if signum:  # the run ends here: its metrics and progress bar too
                    bar.close()
                    log.close()
                    raise Interrupted(signum, step, checkpoint, state.resume_key, accelerator.is_main_process)
                if step >= stop:
                    break
        bar.close()
        if state.seconds is not None:
            state.seconds += time.perf_counter() - tic
        return step


def clip_gradients(accelerator: Accelerator, optimizer: torch.optim.Optimizer, params: list[Tensor], max_norm: float,
                   mode: str) -> None:
    """`train.clip_mode`: `global` scales every gradient by max_norm / ‖all gradients‖ when that is below 1;
    `per_tensor` scales each tensor's gradient by max_norm / (‖g‖ + 1e-6) when that is below 1, DINO's
    `utils.clip_gradients` (`--clip_grad`), with no host sync (a factor clamped to 1 multiplies exactly)."""
    if mode == "global":
        accelerator.clip_grad_norm_(params, max_norm)
        return
    accelerator.unscale_gradients(optimizer)  # fp16: clip the true gradients, as clip_grad_norm_ does
    for p in params:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm(2) + 1e-6)).clamp(max=1.0))


def drop_frozen_gradients(optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Parameters of a group with `frozen_epochs` > epoch keep no gradient, so the optimizer leaves them (and
    their weight decay) alone, as DINO's `cancel_gradients_last_layer` after clipping."""
    for group in optimizer.param_groups:
        if epoch < group.get("frozen_epochs", 0):
            for p in group["params"]:
                p.grad = None


def _raise_if_non_finite(watch: NonFiniteWatch, accelerator: Accelerator, run_dir: Path, state: LoopState,
                         per_epoch: int) -> None:
    """NonFiniteLossError naming the first bad step and the newest checkpoint, which precedes it: every
    checkpoint is written after this check."""
    bad = watch.first(accelerator)
    if bad is None:
        return
    step, loss = bad
    last = checkpoint_dirs(run_dir)
    raise NonFiniteLossError(
        f"non-finite loss ({loss}) at step {step} (epoch {(step - 1) // per_epoch}); "
        f"last good checkpoint: {last[-1] if last else 'none'}. Continue from it with "
        f"`{state.resume_key}=auto` and a lower `{state.lr_key}`"
        + (" (or train.mixed_precision=bf16/no)." if state.lr_key.startswith("train.") else ".")
    )


def _batch_size(batch: Any) -> int:
    """Images per process in a (views_or_images, labels) batch."""
    return len(batch[1])
