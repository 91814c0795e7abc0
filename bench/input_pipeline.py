"""Does the input pipeline keep up? Training throughput on the real sample dataset against synthetic tensors.

Real: the demo recipe (configs/pretrain/sample.yaml: data/sample, 28 px, batch 128, its LoDisc
model) trained by the library's loop (`sslfg.engine.loop.run_loop`, with the accelerator, AdamW,
schedules and EMA update of `sslfg.pretrain`), fed by the DataLoader pretraining builds
(EpochBatchSampler + SeededDataset + TwoViewTransform, persistent workers). Synthetic: the same
loop and model fed one pre-made batch of the same shape. Images/s come from the time between the
EMA updates of the last `--steps` steps (the first `--warmup` steps and the final checkpoint are
left out); the ratio real/synthetic is taken per round and the table gives its median (min–max).

On a machine with few cores, loader workers compete with torch's compute threads, so each setting
`num_workers:threads` (threads = torch.set_num_threads of the training process; workers always
run one thread) is compared with synthetic steps at the same thread count, and all settings are
interleaved in rounds (reversed every other round). Also reported: the loader alone (images/s,
no model) and the per-image cost of decoding and of the two-view transform on one thread.

    python -m sslfg.data.sample                  # once: builds data/sample
    python bench/input_pipeline.py [--variants 2:2,1:2,0:2,2:1,1:1] [--steps 8] [--rounds 2]
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
from common import markdown_table, median_spread, num_threads, sample_config
from torch.utils.data import DataLoader

from sslfg.data.datasets import build_dataset
from sslfg.data.sampling import EpochBatchSampler, SeededDataset, sample_seed, seeded_loader
from sslfg.data.transforms import TwoViewTransform
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.loop import LoopState, run_loop, steps_per_epoch
from sslfg.engine.metrics import MetricsLog
from sslfg.models.lodisc import LoDisc
from sslfg.pretrain import build_schedules
from sslfg.schema import PretrainConfig


class Trainer:
    """What `sslfg.pretrain.pretrain` assembles around the loop: accelerator, LoDisc, AdamW, schedules."""

    def __init__(self, cfg: PretrainConfig, sampler: EpochBatchSampler, run_dir: Path) -> None:
        t = cfg.train
        self.cfg, self.sampler, self.run_dir = cfg, sampler, run_dir
        self.accelerator = make_accelerator(t.mixed_precision, t.grad_accum_steps)
        torch.manual_seed(cfg.seed)
        model = LoDisc(cfg.model, cfg.data.image_size)
        per_epoch = steps_per_epoch(sampler, t.grad_accum_steps)
        self.schedules = build_schedules(cfg, t.epochs * per_epoch, t.batch_size, per_epoch)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=float(self.schedules["lr"][0]), betas=t.betas, weight_decay=t.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.lodisc: LoDisc = self.accelerator.unwrap_model(self.model)
        self.metrics = MetricsLog(run_dir, enabled=True)

    def compute_loss(self, batch: Any) -> dict[str, torch.Tensor]:
        (x1, x2), _ = batch
        device = self.accelerator.device
        out = self.model(x1.to(device, non_blocking=True), x2.to(device, non_blocking=True))
        out.pop("keep_idx", None)
        return out

    def images_per_second(self, loader: Iterable[Any], steps: int, warmup: int) -> float:
        """Runs warmup + steps optimizer steps of the library loop; images/s over the last `steps`."""
        stamps: list[float] = []

        def after_step(step: int) -> None:
            self.lodisc.update_momentum(float(self.schedules["momentum"][step]))
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
                self.compute_loss,
                after_step,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        default="2:2,1:2,0:2,2:1,1:1",
        help="comma-separated num_workers:threads settings of the real pipeline",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all settings")
    parser.add_argument("--images", type=int, default=256, help="images for the per-image costs")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the timed interval starts at the end of a warm-up step)")
    variants = [tuple(int(v) for v in item.split(":")) for item in args.variants.split(",")]

    cfg = sample_config()
    batch = cfg.train.batch_size
    transform = TwoViewTransform(cfg.data.image_size, cfg.augment, cfg.data.mean, cfg.data.std)
    dataset = build_dataset(cfg.data, cfg.data.train_split, transform)
    sampler = EpochBatchSampler(len(dataset), batch, seed=cfg.seed)
    default_threads = torch.get_num_threads()

    costs = per_image_costs(cfg, transform, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, sampler, Path(tmp))
        device = trainer.accelerator.device
        pin = device.type == "cuda"
        loaders = {w: seeded_loader(dataset, sampler, w, pin_memory=pin) for w in sorted({w for w, _ in variants})}
        alone = {w: loader_alone(loader, sampler, args.steps, args.warmup) for w, loader in loaders.items()}
        size = cfg.data.image_size
        synthetic = [((torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)), torch.zeros(batch))]

        keys = [("synthetic", 0, t) for t in sorted({t for _, t in variants}, reverse=True)]
        keys += [("real", w, t) for w, t in variants]
        speed: dict[tuple[str, int, int], list[float]] = {key: [] for key in keys}
        for r in range(args.rounds):
            for key in keys if r % 2 == 0 else reversed(keys):
                kind, w, t = key
                feed = synthetic * (args.warmup + args.steps) if kind == "synthetic" else loaders[w]
                with num_threads(t):
                    speed[key].append(trainer.images_per_second(feed, args.steps, args.warmup))

    default = (cfg.data.num_workers, default_threads)
    print(
        f"### Input pipeline: sample recipe (data/sample, {size} px, batch {batch}, local_view "
        f"{cfg.model.local_view}), {os.cpu_count()} CPUs, {args.rounds} rounds x {args.steps} steps\n"
    )
    rows = []
    for w, t in variants:
        real, synth = speed[("real", w, t)], speed[("synthetic", 0, t)]
        ratios = [a / b for a, b in zip(real, synth, strict=True)]
        name = f"{w} workers, {t} threads" + (" (default)" if (w, t) == default else "")
        rows.append(
            [
                name,
                f"{statistics.median(real):.0f}",
                f"{statistics.median(synth):.0f}",
                median_spread([100 * x for x in ratios], "{:.0f}") + " %",
            ]
        )
    print(markdown_table(["setting", "real images/s", "synthetic images/s (same threads)", "real / synthetic"], rows))
    print(
        "\n"
        + markdown_table(
            ["loader alone", "images/s"],
            [[f"{w} workers" if w else "0 workers (main process)", f"{v:.0f}"] for w, v in alone.items()],
        )
    )
    print(
        "\n"
        + markdown_table(
            ["per image, 1 thread", "ms", "images/s per worker"],
            [[k, f"{v:.2f}", f"{1000 / v:.0f}"] for k, v in costs.items()],
        )
    )


if __name__ == "__main__":
    main()
