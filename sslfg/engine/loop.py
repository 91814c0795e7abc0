"""The training loop shared by pretraining and fine-tuning, readable top to bottom.

Gradient accumulation, clipping and mixed precision come from Accelerate; the lr, weight decay
and any other schedule are arrays indexed by the global optimizer step; a checkpoint every
`checkpoint_every` steps can be resumed mid-epoch exactly. SIGTERM, SIGUSR1 and SIGINT end the
loop after a step, with a checkpoint (`sslfg.engine.preemption`).
"""

from __future__ import annotations

import math
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

from sslfg.data.sampling import EpochBatchSampler
from sslfg.engine.checkpoint import checkpoint_dirs, save_checkpoint
from sslfg.engine.metrics import MetricsLog
from sslfg.engine.preemption import Interrupted, StopSignals
from sslfg.schema import LoopConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing of that step was applied or saved."""


@dataclass
class LoopState:
    """What the loop needs besides the model: where it starts and what it schedules."""

    schedules: dict[str, np.ndarray]  # "lr", "weight_decay", and any other per-step value
    start_step: int = 0
    lr_key: str = "train.base_lr"  # the keys a non-finite loss error tells the user to change
    resume_key: str = "resume"
    images_seen: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Training throughput of the loop so far, all processes together."""
        return round(self.images_seen / max(self.seconds, 1e-9), 1)


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
    after_step: Callable[[int], None] | None = None,
) -> int:
    """Trains from `state.start_step` to the end of the schedule (or `train.max_steps`).

    compute_loss(batch) returns {"loss": scalar, ...more scalars to log}; after_step(step) runs
    once per applied optimizer step (the EMA update). Returns the last step reached; a stop signal
    raises `Interrupted` after the step in flight and its checkpoint.
    """
    with StopSignals(train.stop_check_every) as signals:
        per_epoch = steps_per_epoch(sampler, train.grad_accum_steps)
        total = len(state.schedules["lr"])
        stop = min(total, train.max_steps) if train.max_steps > 0 else total
        step = state.start_step
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bar = tqdm(total=stop, initial=step, disable=not accelerator.is_main_process, dynamic_ncols=True)
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
                    out = compute_loss(batch)
                    names = sorted(out)
                    values = accelerator.reduce(torch.stack([out[k].detach().float() for k in names]), "mean")
                    values = dict(zip(names, values.tolist(), strict=True))
                    if not math.isfinite(values["loss"]):
                        last = checkpoint_dirs(run_dir)
                        raise NonFiniteLossError(
                            f"non-finite loss ({values['loss']}) at step {step} (epoch {epoch}); "
                            f"last good checkpoint: {last[-1] if last else 'none'}. Continue from it with "
                            f"`{state.resume_key}=auto` and a lower `{state.lr_key}`"
                            + (" (or train.mixed_precision=bf16/no)." if state.lr_key.startswith("train.") else ".")
                        )
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients and train.clip_grad > 0:
                        accelerator.clip_grad_norm_(params, train.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.images_seen += _batch_size(batch) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                if after_step is not None and not accelerator.optimizer_step_was_skipped:
                    after_step(step)
                step += 1
                if step % train.log_every == 0 or step == stop:
                    scheduled = {k: float(v[step - 1]) for k, v in state.schedules.items()}
                    log.log(step, {"epoch": epoch, **values, **scheduled})
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{values['loss']:.4f}")
                signum = signals.requested(accelerator, step)
                if step % train.checkpoint_every == 0 or step == stop or signum:
                    checkpoint = save_checkpoint(accelerator, run_dir, step, train.keep_checkpoints)
                if signum:  # the run ends here: its metrics and progress bar too
                    bar.close()
                    log.close()
                    raise Interrupted(signum, step, checkpoint, state.resume_key, accelerator.is_main_process)
                if step >= stop:
                    break
        bar.close()
        state.seconds += time.perf_counter() - tic
        return step


def _batch_size(batch: Any) -> int:
    """Images per process in a (views_or_images, labels) batch."""
    return len(batch[1])
