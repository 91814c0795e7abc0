"""Does the input pipeline keep up? Training throughput on the real sample dataset against synthetic tensors,
with the two-view augmentation in the loader workers (PIL) or batched on the training device.

Real: the demo recipe (configs/pretrain/sample.yaml: data/sample, 28 px, batch 128, its LoDisc
model) trained by the library's loop (`sslfg.engine.loop.run_loop`, with the accelerator, AdamW,
schedules and EMA update of `sslfg.pretrain`), fed by the DataLoader pretraining builds
(EpochBatchSampler + SeededDataset + the `data.augment_on` pipeline of `sslfg.data.batch_augment`,
persistent workers): `workers` runs TwoViewTransform per image, `device` crops in the workers and
augments the batch in `compute_loss`. Synthetic: the same loop and model fed one pre-made batch of
the same shape. Images/s come from the time between the
EMA updates of the last `--steps` steps (the first `--warmup` steps and the final checkpoint are
left out); the ratio real/synthetic is taken per round and the table gives its median (min–max).

On a machine with few cores, loader workers compete with torch's compute threads, so each setting
`path:num_workers:threads` (threads = torch.set_num_threads of the training process; workers always
run one thread) is compared with synthetic steps at the same thread count, and all settings are
interleaved in rounds (reversed every other round). Also reported: the loader alone (images/s,
no model), the per-image cost of decoding and of the two-view transform on one thread, and the
two-view augmentation's throughput per CPU core, PIL against the batched path (worker half on one
thread; device half on one CPU thread, or on the GPU with `--device cuda`), in interleaved rounds.

    python -m sslfg.data.build.sample                  # once: builds data/sample
    python bench/input_pipeline.py [--variants workers:2:2,device:2:2] [--steps 8] [--rounds 2]
    python bench/input_pipeline.py --device cuda --variants workers:4:0,device:4:0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from common import markdown_table, median_spread, num_threads, sample_config, synchronize
from torch.utils.data import DataLoader

from sslfg.data.batch_augment import (
    TwoViewCrops,
    TwoViewPipeline,
    photometric,
    resolve_augment_on,
    two_view_pipeline,
)
from sslfg.data.datasets import build_dataset
from sslfg.data.loader import EpochBatchSampler, SeededDataset, sample_seed, seeded_loader
from sslfg.data.transforms import TwoViewTransform
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.loop import LoopState, run_loop, steps_per_epoch
from sslfg.engine.metrics import MetricsLog
from sslfg.methods import MomentumMethod, build_method
from sslfg.pretrain import build_schedules, method_hooks
from sslfg.schema import PretrainConfig


class Trainer:
    """What `sslfg.pretrain.pretrain` assembles around the loop: accelerator, the method, AdamW, schedules."""

    def __init__(self, cfg: PretrainConfig, sampler: EpochBatchSampler, run_dir: Path) -> None:
        t = cfg.train
        self.cfg, self.sampler, self.run_dir = cfg, sampler, run_dir
        self.accelerator = make_accelerator(t.mixed_precision, t.grad_accum_steps)
        torch.manual_seed(cfg.seed)
        model = build_method(cfg.model, cfg.method, cfg.data.image_size)
        per_epoch = steps_per_epoch(sampler, t.grad_accum_steps)
        self.schedules = build_schedules(cfg, model, t.epochs * per_epoch, t.batch_size, per_epoch)
        optimizer = torch.optim.AdamW(
            model.param_groups(), lr=float(self.schedules["lr"][0]), betas=t.betas, weight_decay=t.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.method: MomentumMethod = self.accelerator.unwrap_model(self.model)
        self.metrics = MetricsLog(run_dir, enabled=True)

    def images_per_second(self, loader: Iterable[Any], views: TwoViewPipeline, steps: int, warmup: int) -> float:
        """Runs warmup + steps optimizer steps of the library loop; images/s over the last `steps`."""
        stamps: list[float] = []

        def compute_loss(batch: Any) -> dict[str, torch.Tensor]:  # as sslfg.pretrain's
            return self.model(*views.to_device(batch[0], self.accelerator.device))

        hooks = method_hooks(self.method, self.schedules)

        def after_update(step: int, applied: bool) -> None:  # sslfg.pretrain's, and a time stamp
            hooks["after_update"](step, applied)
            stamps.append(time.perf_counter())

        train = dataclasses.replace(self.cfg.train, max_steps=warmup + steps)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # the loop's progress bar
            run_loop(
                self.accelerator,
                self.model,
                self.optimizer,
                loader,
                self.sampler,
                train,
                LoopState(schedules=self.schedules),
                self.run_dir,
                self.metrics,
                compute_loss,
                before_step=hooks["before_step"],
                after_update=after_update,
            )
        return steps * self.cfg.train.batch_size / (stamps[-1] - stamps[warmup - 1])


def loader_alone(loader: DataLoader, sampler: EpochBatchSampler, steps: int, warmup: int) -> float:
    """Images/s of iterating the loader with no model, after `warmup` batches."""
    sampler.set_epoch(0)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    tic = time.perf_counter()
    images = sum(len(next(it)[1]) for _ in range(steps))
    return images / (time.perf_counter() - tic)


def per_image_costs(cfg: PretrainConfig, transform: TwoViewTransform, n: int) -> dict[str, float]:
    """Milliseconds per image on one thread: decode, two-view transform, and a whole loader item."""
    raw = build_dataset(cfg.data, cfg.data.train_split)
    seeded = SeededDataset(build_dataset(cfg.data, cfg.data.train_split, transform))
    n = min(n, len(raw))
    costs = {}
    with num_threads(1):
        tic = time.perf_counter()
        images = [raw[i][0] for i in range(n)]
        costs["decode (load_image)"] = time.perf_counter() - tic
        tic = time.perf_counter()
        for img in images:
            transform(img)
        costs["TwoViewTransform (both views)"] = time.perf_counter() - tic
        tic = time.perf_counter()
        for i in range(n):
            seeded[(i, sample_seed(cfg.seed, 0, i))]
        costs["SeededDataset item (decode + seed + transform)"] = time.perf_counter() - tic
    return {name: 1000 * seconds / n for name, seconds in costs.items()}


def augment_throughput(cfg: PretrainConfig, n: int, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per image of the two-view augmentation on n decoded images, per round: the PIL path
    (TwoViewTransform), and the batched path's worker half (TwoViewCrops) and device half (`photometric`
    on the batch of n, on `device`), all on one CPU thread, interleaved and reversed every other round."""
    size, aug, mean, std = cfg.data.image_size, cfg.augment, cfg.data.mean, cfg.data.std
    pil, crops = TwoViewTransform(size, aug, mean, std), TwoViewCrops(size, aug)
    raw = build_dataset(cfg.data, cfg.data.train_split)
    images = [raw[i][0] for i in range(min(n, len(raw)))]
    torch.manual_seed(0)
    u1, u2, params = (torch.stack(parts).to(device) for parts in zip(*(crops(img) for img in images), strict=True))
    hue = aug.jitter_p > 0 and aug.jitter[3] > 0

    def device_half() -> None:
        photometric(u1, params[:, 0], mean, std, hue)
        photometric(u2, params[:, 1], mean, std, hue)

    fns = {"PIL (workers)": lambda: [pil(img) for img in images],
           "batched: worker half (crop, flip, draw)": lambda: [crops(img) for img in images],
           f"batched: device half ({device.type})": device_half}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with num_threads(1):
        device_half()  # warm-up
        for r in range(rounds):
            for name in fns if r % 2 == 0 else reversed(list(fns)):
                synchronize(device)
                tic = time.perf_counter()
                fns[name]()
                synchronize(device)
                times[name].append((time.perf_counter() - tic) / len(images))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        default="workers:2:2,device:2:2,workers:0:2,device:0:2",
        help="comma-separated augment_on:num_workers:threads settings of the real pipeline (threads 0: as is)",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all settings")
    parser.add_argument("--images", type=int, default=256, help="images for the per-image costs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the training loop and the batched augmentation run (cuda: the first GPU)")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the timed interval starts at the end of a warm-up step)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the accelerator then trains on the CPU
    variants = [(path, int(w), int(t)) for path, w, t in (item.split(":") for item in args.variants.split(","))]

    cfg = sample_config()
    batch, size = cfg.train.batch_size, cfg.data.image_size
    pipelines = {path: two_view_pipeline(size, cfg.augment, cfg.data.mean, cfg.data.std, path)
                 for path in sorted({path for path, _, _ in variants})}
    datasets = {path: build_dataset(cfg.data, cfg.data.train_split, p.transform) for path, p in pipelines.items()}
    sampler = EpochBatchSampler(len(next(iter(datasets.values()))), batch, seed=cfg.seed)
    default_threads = torch.get_num_threads()

    costs = per_image_costs(cfg, TwoViewTransform(size, cfg.augment, cfg.data.mean, cfg.data.std), args.images)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, sampler, Path(tmp))
        device = trainer.accelerator.device
        augment = augment_throughput(cfg, args.images, max(3, args.rounds), device)
        pin = device.type == "cuda"
        loaders = {(path, w): seeded_loader(datasets[path], sampler, w, pin_memory=pin) for path, w, _ in variants}
        alone = {key: loader_alone(loader, sampler, args.steps, args.warmup) for key, loader in loaders.items()}
        synthetic = [((torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)), torch.zeros(batch))]
        plain = pipelines.get("workers") or two_view_pipeline(size, cfg.augment, cfg.data.mean, cfg.data.std, "workers")

        keys = [("synthetic", "", 0, t) for t in sorted({t for _, _, t in variants}, reverse=True)]
        keys += [("real", path, w, t) for path, w, t in variants]
        speed: dict[tuple[str, str, int, int], list[float]] = {key: [] for key in keys}
        for r in range(args.rounds):
            for key in keys if r % 2 == 0 else reversed(keys):
                kind, path, w, t = key
                feed = synthetic * (args.warmup + args.steps) if kind == "synthetic" else loaders[(path, w)]
                with num_threads(t):
                    views = plain if kind == "synthetic" else pipelines[path]
                    speed[key].append(trainer.images_per_second(feed, views, args.steps, args.warmup))

    default = (resolve_augment_on(cfg.data.augment_on, device, size), cfg.data.num_workers, default_threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
    print(
        f"### Input pipeline: sample recipe (data/sample, {size} px, batch {batch}, local_view "
        f"{cfg.method.local.view}), {where}, {args.rounds} rounds x {args.steps} steps\n"
    )
    rows = []
    for path, w, t in variants:
        real, synth = speed[("real", path, w, t)], speed[("synthetic", "", 0, t)]
        ratios = [a / b for a, b in zip(real, synth, strict=True)]
        name = f"augment_on {path}, {w} workers, {t or default_threads} threads" + (
            " (default)" if (path, w, t or default_threads) == default else "")
        rows.append([name, f"{statistics.median(real):.0f}", f"{statistics.median(synth):.0f}",
                     median_spread([100 * x for x in ratios], "{:.0f}") + " %"])
    print(markdown_table(["setting", "real images/s", "synthetic images/s (same threads)", "real / synthetic"], rows))
    print("\n" + markdown_table(
        ["loader alone", "images/s"],
        [[f"augment_on {path}, " + (f"{w} workers" if w else "0 workers (main process)"), f"{v:.0f}"]
         for (path, w), v in alone.items()]))
    per_image = {name: statistics.median(v) * 1000 for name, v in augment.items()}
    pil_name, worker_half, device_half = list(augment)
    batched = [a + b for a, b in zip(augment[worker_half], augment[device_half], strict=True)]
    ratio = [p / b for p, b in zip(augment[pil_name], batched, strict=True)]
    print(f"\nTwo-view augmentation of {min(args.images, len(sampler) * batch)} images, both views, "
          f"one CPU thread ({'device half on ' + where if device.type == 'cuda' else 'both halves on the CPU'}):\n")
    print(markdown_table(
        ["path", "ms per image", "images/s per core"],
        [[name, f"{ms:.3f}", f"{1000 / ms:.0f}"] for name, ms in per_image.items()]
        + [["batched: both halves", f"{statistics.median(batched) * 1000:.3f}",
            f"{1 / statistics.median(batched):.0f}"],
           ["PIL / batched (time, per round)", median_spread(ratio), ""]]))
    print(
        "\n"
        + markdown_table(
            ["per image, 1 thread", "ms", "images/s per worker"],
            [[k, f"{v:.2f}", f"{1000 / v:.0f}"] for k, v in costs.items()],
        )
    )


if __name__ == "__main__":
    main()
