"""Shards against the folder layout (issue 25), side by side in one run: loader images/s with a cold and a warm
page cache, pretraining step images/s and its real/synthetic ratio (P4), and the memory of a 10 M-image index.

Sets: the sample (data/sample train_val: 10,000 PNGs of 28 px, the sample recipe) and `--synthetic` JPEGs of
224 px in an imagefolder layout generated under a temporary folder (deleted at the end), each written to shards
by `sslfg.data.shards` (its images/s reported). Loader: the training DataLoader (EpochBatchSampler, seeded items,
the `data.augment_on: device` crops in `--workers` workers), `--batches` batches after 2 untimed ones; cold: every
file of the layout dropped from the page cache first (posix_fadvise DONTNEED), warm: every file read once first.
Step: the library's loop (bench/input_pipeline.py's Trainer) on the sample recipe's model, fed by the folder
loader, the shard loader, or one pre-made batch of views (synthetic: no augmentation), or one loaded batch repeated
through the device augmentation (augmented: no loader; shards / augmented is the loader's own cost to the
step, shards / synthetic also counts the augmentation, which runs on the CPU unless `--device cuda`); at 224 px
with patch 16, batch `--batch`, and the sample recipe's ViT (128 wide, 4 blocks) or each of `--models` (timm's
own architecture of that name). The timed steps of a loader-fed step start after the
batches its workers prefetch (2 per worker), so that they read the loader's steady state, not its queue.
Memory: a 10 M-sample index (numbers only, one empty shard) opened by the reader: array bytes and RSS growth.

    python -m sslfg.data.build.sample              # once: builds data/sample
    python bench/shards.py [--sample data/sample] [--synthetic 20000] [--batches 20] [--steps 6]
    python bench/shards.py --device cuda --workers 12 --batch 128 --steps 40 --mixed-precision bf16 \
        --models vit_tiny_patch16_224,vit_small_patch16_224      # on a GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import ROOT, markdown_table, sample_config
from input_pipeline import Trainer, loader_alone
from PIL import Image
from torch.utils.data import Dataset

from sslfg.data.batch_augment import TwoViewPipeline, two_view_pipeline
from sslfg.data.datasets import build_dataset
from sslfg.data.loader import EpochBatchSampler, seeded_loader
from sslfg.data.shard_reader import FORMAT_VERSION, INDEX_ARRAYS, ShardDataset, shard_name
from sslfg.data.shards import write_shards
from sslfg.schema import DataConfig, PretrainConfig

INDEX_SAMPLES = 10_000_000


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def index_memory(tmp: Path, n: int, boxes: bool) -> tuple[int, int]:
    """(array bytes, RSS growth) of a ShardDataset over an index of `n` samples written as the writer does."""
    root = tmp / f"index{int(boxes)}"
    root.mkdir()
    (root / shard_name("big", 0)).touch()
    arrays = {"shard": np.zeros(n, np.uint32), "offset": np.arange(n, dtype=np.int64) * 4096,
              "nbytes": np.full(n, 4096, np.uint32), "label": np.arange(n, dtype=np.int32) % 10_000,
              "size": np.full((n, 2), 224, np.int32), "ext": np.zeros(n, np.uint8)}
    if boxes:
        arrays["box"] = np.ones((n, 4), np.float64)
    assert set(INDEX_ARRAYS) <= set(arrays)
    np.savez(root / "big.npz", **arrays)
    meta = {"format": FORMAT_VERSION, "split": "big", "source": "synthetic", "samples": n, "boxes": boxes,
            "shardlist": [{"url": shard_name("big", 0), "filesize": 0, "nsamples": n}], "classes": ["c"] * 10_000,
            "extensions": ["jpg"], "overlaps_train": 0, "skipped": 0}
    (root / "big.json").write_text(json.dumps(meta))
    del arrays
    before = rss()
    dataset = ShardDataset(str(root), "big", boxes=boxes)
    grown = rss() - before
    nbytes = sum(v.nbytes for v in vars(dataset).values() if isinstance(v, np.ndarray))
    return nbytes, grown


JPEG_CHUNK = 1000


def write_jpegs(root: Path, start: int, stop: int, classes: int) -> None:
    """Images start..stop-1 of synthetic_jpegs, from a generator seeded by `start` (the same set at any --jobs)."""
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        folder = root / "train" / str(i % classes)
        folder.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)).resize((224, 224), Image.BICUBIC)
        grain = rng.integers(-12, 13, (224, 224, 3))
        pixels = np.clip(np.asarray(small, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def synthetic_jpegs(root: Path, n: int, jobs: int, classes: int = 10) -> Path:
    """`n` 224 px JPEGs (smooth colour fields with grain, ~photo-sized files) as root/train/<class>/<i>.jpg,
    written by `jobs` processes."""
    starts = range(0, n, JPEG_CHUNK)
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(write_jpegs, [root] * len(starts), starts, [min(a + JPEG_CHUNK, n) for a in starts],
                      [classes] * len(starts)))
    return root


def files_of(data: DataConfig, split: str) -> list[str]:
    """Every file the layout reads for `split`: the images, or the shards."""
    if data.format == "shards":
        return sorted(str(p) for p in Path(data.root).glob(f"{split}-*.tar"))
    return list(build_dataset(data, split).paths)


def set_cache(paths: list[str], cold: bool) -> None:
    """Drops the files from the page cache (cold), or reads each once (warm)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            if cold:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 20):
                    pass
        finally:
            os.close(fd)


def step_speeds(cfg: PretrainConfig, sampler: EpochBatchSampler, views: TwoViewPipeline,
                datasets: dict[str, Dataset], tmp: Path, steps: int, prefetched: int, pin: bool) -> dict[str, float]:
    """Step images/s fed by each layout's loader, by one pre-made batch of views on the device (synthetic), and
    by one loaded batch repeated through the device augmentation (augmented)."""
    d, batch, workers = cfg.data, cfg.train.batch_size, cfg.data.num_workers
    with tempfile.TemporaryDirectory(dir=tmp) as run_dir:
        trainer = Trainer(cfg, sampler, Path(run_dir))
        device = trainer.accelerator.device
        made = (torch.randn(batch, 3, d.image_size, d.image_size, device=device),) * 2
        plain = two_view_pipeline(d.image_size, cfg.augment, d.mean, d.std, "workers")
        step = {"synthetic": trainer.images_per_second([(made, torch.zeros(batch))] * (2 + steps), plain, steps, 2)}
        # one loaded batch, repeated, through the device augmentation: the step and the augmentation
        # without the loader, so that P4 from it measures what reading and decoding cost the step
        loader = seeded_loader(datasets["shards"], sampler, workers, pin)
        loaded = next(iter(loader))
        del loader
        step["augmented"] = trainer.images_per_second([loaded] * (2 + steps), views, steps, 2)
        for layout in ("shards", "folder"):
            loader = seeded_loader(datasets[layout], sampler, workers, pin)
            step[layout] = trainer.images_per_second(loader, views, steps, prefetched)
            del loader
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default=str(ROOT / "data" / "sample"), help="the sample dataset's folder")
    parser.add_argument("--synthetic", type=int, default=20_000, help="224 px JPEGs to generate (0: none)")
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches per measurement")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per measurement")
    parser.add_argument("--index", type=int, default=INDEX_SAMPLES, help="samples of the index measured for memory")
    parser.add_argument("--tmp", default=None, help="folder for the generated data (default: the system's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the step and the device augmentation run (cuda: the first GPU)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the 224 px set")
    parser.add_argument("--models", default=None,
                        help="comma-separated timm models stepped on the 224 px set, each with timm's own width and "
                             "depth (default: the sample recipe's 128-wide, 4-block ViT)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                        help="the steps' train.mixed_precision")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes that write the JPEGs")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    elif not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    pin = args.device == "cuda"
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        memory = [(boxes, *index_memory(tmp, args.index, boxes)) for boxes in (False, True)]
        for boxes in (0, 1):
            for f in (tmp / f"index{boxes}").iterdir():
                f.unlink()

        base = sample_config()
        base.data.root, base.data.num_workers = args.sample, args.workers
        base.train = dataclasses.replace(base.train, mixed_precision=args.mixed_precision)
        recipe = "the sample recipe's ViT"  # its model.kwargs: 128 wide, 4 blocks
        sets: dict[str, tuple[PretrainConfig, int, list[str]]] = {"sample (28 px PNG)": (base, 128, [recipe])}
        if args.synthetic:
            cfg = dataclasses.replace(base, data=dataclasses.replace(
                base.data, root=str(synthetic_jpegs(tmp / "jpegs", args.synthetic, args.jobs)), format="imagefolder",
                train_split="train", image_size=224, num_classes=0))
            cfg.model = dataclasses.replace(base.model, patch_size=16)
            models = args.models.split(",") if args.models else [recipe]
            sets[f"synthetic ({args.synthetic} JPEGs, 224 px)"] = (cfg, args.batch, models)

        writer, loader_rows, step_rows = [], [], []
        prefetched = 2 + 2 * args.workers  # untimed steps of a loader-fed step: past the workers' prefetch queue
        for name, (cfg, batch, models) in sets.items():
            cfg.train = dataclasses.replace(cfg.train, batch_size=batch)
            d = cfg.data
            out = tmp / f"shards-{len(writer)}"
            tic = time.perf_counter()
            write_shards(d, str(out))
            seconds = time.perf_counter() - tic
            shard_data = dataclasses.replace(d, root=str(out), format="shards")
            n = len(build_dataset(shard_data, d.train_split))
            writer.append([name, f"{n}", f"{len(files_of(shard_data, d.train_split))}", f"{n / seconds:.0f}"])
            layouts = {"folder": d, "shards": shard_data}
            views = two_view_pipeline(d.image_size, cfg.augment, d.mean, d.std, "device")
            datasets = {k: build_dataset(v, v.train_split, views.transform) for k, v in layouts.items()}
            sampler = EpochBatchSampler(n, batch, seed=cfg.seed)
            speed: dict[tuple[str, str], float] = {}
            for cache in ("cold", "warm"):
                for layout in (("folder", "shards") if cache == "cold" else ("shards", "folder")):
                    set_cache(files_of(layouts[layout], d.train_split), cold=cache == "cold")
                    loader = seeded_loader(datasets[layout], sampler, args.workers, pin)
                    speed[(layout, cache)] = loader_alone(loader, sampler, args.batches, 2)
                    del loader
            for cache in ("cold", "warm"):
                folder, shard = speed[("folder", cache)], speed[("shards", cache)]
                loader_rows.append([name, cache, f"{folder:.0f}", f"{shard:.0f}", f"{shard / folder:.2f}"])
            for model in models:
                if model != recipe:  # timm's own architecture, not the recipe's width and depth
                    cfg.model = dataclasses.replace(cfg.model, name=model, kwargs={})
                step = step_speeds(cfg, sampler, views, datasets, tmp, args.steps, prefetched, pin)
                step_rows.append([name, model, f"{step['folder']:.0f}", f"{step['shards']:.0f}",
                                  f"{step['synthetic']:.0f}", f"{step['augmented']:.0f}",
                                  f"{100 * step['folder'] / step['synthetic']:.0f} %",
                                  f"{100 * step['shards'] / step['synthetic']:.0f} %",
                                  f"{100 * step['shards'] / step['augmented']:.0f} %"])

    where = torch.cuda.get_device_name() if pin else "the CPU"
    print(f"### Shards against folders: {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start, "
          f"{args.workers} loader workers, step and device augmentation on {where}, mixed precision "
          f"{args.mixed_precision}, torch {torch.__version__}\n")
    print(markdown_table(["set", "images", "shards", "writer images/s"], writer))
    print("\n" + markdown_table(["set", "page cache", "folder images/s", "shards images/s", "shards / folder"],
                                loader_rows))
    print("\n" + markdown_table(["set", "model", "folder step images/s", "shards step images/s", "synthetic images/s",
                                 "augmented images/s", "folder / synthetic", "shards / synthetic (P4)",
                                 "shards / augmented"], step_rows))
    print("\n" + markdown_table(
        [f"index of {args.index:,} samples", "array bytes", "RSS growth", "bytes per sample"],
        [[("with boxes" if boxes else "no boxes"), f"{nbytes / 2**20:.0f} MiB", f"{grown / 2**20:.0f} MiB",
          f"{nbytes / args.index:.0f}"] for boxes, nbytes, grown in memory]))


if __name__ == "__main__":
    main()
