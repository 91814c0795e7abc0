"""Pretraining with any method of `sslfg.methods` (MoCo v3, DINO, ..., each with or without LoDisc's local
branch): builds everything from a PretrainConfig and runs the loop.

Called by `sslfg.commands.pretrain` (`train_ssl.py`, `sslfg-pretrain`); importable so that studies and tests run it
in-process.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset

from sslfg.config import ConfigError, key_sources
from sslfg.data.batch_augment import TwoViewPipeline, resolve_augment_on, two_view_pipeline
from sslfg.data.datasets import build_dataset, check_training_folder
from sslfg.data.loader import SeededDataset, sample_seed
from sslfg.data.transforms import denormalize, eval_data_config, local_crop_size
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.engine.loop import compile_modules, steps_per_epoch
from sslfg.engine.run import open_run
from sslfg.engine.schedules import cosine_schedule
from sslfg.evaluation.online import CROP_RATIO, OnlineKnn, OnlineLocalisation, evaluation_data, evaluation_datasets
from sslfg.figures import save_mask_figure
from sslfg.files import write_json
from sslfg.methods import Method, build_method
from sslfg.models.backbone import build_model, require_vit, timm_kwargs
from sslfg.models.heads import check_batch_norm
from sslfg.schema import FeatureConfig, PretrainConfig
from sslfg.summary import kept_patches, startup_summary, token_grid
from sslfg.weights import export_backbone, pretrained_record

log = logging.getLogger(__name__)


def scaled_lr(cfg: PretrainConfig, global_batch: int) -> float:
    """The peak learning rate: base_lr · global batch / 256."""
    return cfg.train.base_lr * global_batch / 256


def method_facts(cfg: PretrainConfig, encoder) -> dict[str, str]:
    """For the start-up summary: the method, whether LoDisc's local branch is on and what it keeps, and the
    online keep precision's settings when it runs."""
    local, t = cfg.method.local, cfg.train
    layers = f"last {local.attention_layers} blocks" if local.attention_layers else "every block"
    kept = (f"{kept_patches(encoder, local.keep_ratio)} patches (keep_ratio {local.keep_ratio:g}, attention of "
            f"{layers})" if local.weight or t.loc_every else "")  # both refuse a backbone without patches first
    facts = {"method": cfg.method.name, "method.local": f"on: weight {local.weight:g}, {local.view} view of {kept}"
             if local.weight else "off (method.local.weight 0)"}
    if cfg.augment.local_crops:
        a = cfg.augment
        facts["augment.local_crops"] = (f"{a.local_crops} local views of {local_crop_size(cfg.data.image_size, a)} px "
                                        f"(scale {a.local_crop_scale[0]:g}-{a.local_crop_scale[1]:g}) besides the 2 "
                                        f"global ones of {cfg.data.image_size} px, {a.interpolation} crops")
    if t.loc_every:
        facts["train.loc_every"] = (f"every {t.loc_every} epochs: {kept} of up to {t.loc_samples} "
                                    f"{evaluation_data(cfg).test_split} images against their boxes, crop ratio "
                                    f"{CROP_RATIO:g}")
    return facts


def build_schedules(cfg: PretrainConfig, method: Method, total_steps: int, global_batch: int,
                    per_epoch: int) -> dict:
    """lr (scaled by global batch / 256, warmup + cosine), weight decay and the method's own values (EMA
    momentum, ...) per step."""
    t = cfg.train
    lr = scaled_lr(cfg, global_batch)
    wd_end = t.weight_decay if t.weight_decay_end < 0 else t.weight_decay_end
    return {
        "lr": cosine_schedule(lr, t.min_lr, total_steps, warmup_steps=round(t.warmup_epochs * per_epoch)),
        "weight_decay": cosine_schedule(t.weight_decay, wd_end, total_steps),
        **method.schedules(total_steps, per_epoch),
    }


def online_evaluations(cfg: PretrainConfig, accelerator,
                       train: Dataset) -> tuple[OnlineKnn | None, OnlineLocalisation | None, dict[str, str]]:
    """The online kNN (train.knn_every) and keep precision (train.loc_every) the recipe asks for, on one set of
    `evaluation_datasets` (`train`, the pretraining's train split, is the kNN bank's images when they are the same
    data), built now so that --check meets every error their first evaluation would, and a start-up summary line
    for each saying on which data it runs, or that it is off and why: on data without labels (and no
    eval_data.root) the kNN is off, and so is the keep precision unless that data has boxes, each with one logged
    warning."""
    datasets = evaluation_datasets(cfg, train)  # each split built on first use, once for both
    t, data = cfg.train, datasets.data
    labelled = data.format != "folder" and data.labels
    wanted = {"online_knn": (t.knn_every, labelled, lambda: OnlineKnn(cfg, accelerator, datasets)),
              "online_loc": (t.loc_every, labelled or data.boxes, lambda: OnlineLocalisation(cfg, datasets))}
    built, notes = {}, {}
    for name, (every, possible, build) in wanted.items():
        key = f"train.{name.removeprefix('online_')}_every"
        if every == 0:
            continue
        if not possible:
            notes[name] = (f"off: {data.root} has no labels (data.format={data.format}, data.labels={data.labels}); "
                           f"set eval_data.root to a labelled dataset to run it, or {key}=0")
            if accelerator.is_main_process:
                log.warning("%s=%d: %s", key, every, notes[name])
            continue
        built[name] = build()
        splits = f"bank {data.train_split}, queries {data.test_split}" if name == "online_knn" else data.test_split
        notes[name] = (f"every {every} epochs on {data.root} ({'eval_data' if cfg.eval_data.root else 'data'}: "
                       f"{splits})")
    return built.get("online_knn"), built.get("online_loc"), notes


def method_hooks(method: Method, schedules: dict[str, np.ndarray]) -> dict[str, Callable[..., None]]:
    """The loop's before_step and after_update: the method's own hooks with the step's values of its schedules."""
    own = {k: v for k, v in schedules.items() if k not in ("lr", "weight_decay")}  # momentum, teacher_temp, ...

    def values(step: int) -> dict[str, float]:
        return {k: float(v[step]) for k, v in own.items()}

    return {"before_step": lambda s: method.set_step(values(s)),
            "after_update": lambda s, applied: method.after_update(values(s), applied)}


def local_view_sizes(cfg: PretrainConfig) -> tuple[PretrainConfig, dict[str, str]]:
    """`cfg` with timm's dynamic_img_size on when `augment.local_crops` asks for local views and the backbone is a
    timm ViT whose model.kwargs leave it unset (without it a ViT takes data.image_size only), and the start-up
    summary line that says so. The kwarg goes into config.yaml and backbone.json, which rebuild the same model."""
    kwargs = cfg.model.kwargs
    if not cfg.augment.local_crops or "dynamic_img_size" in kwargs:
        return cfg, {}
    with torch.random.fork_rng(devices=[]):  # a look at the architecture: the run's own init is drawn later
        encoder, _ = build_model(cfg.model.name, timm_kwargs(cfg.data.image_size, cfg.model.patch_size, kwargs))
    if not isinstance(encoder, VisionTransformer):
        return cfg, {}
    cfg = copy.copy(cfg)  # the caller's config (a study's) stays as it was
    cfg.model = dataclasses.replace(cfg.model, kwargs={**kwargs, "dynamic_img_size": True})
    return cfg, {"model.kwargs.dynamic_img_size": "true, set for augment.local_crops (a ViT takes the local views' "
                                                  "size only with it; timm resamples the position embedding)"}


def check_local_views(cfg: PretrainConfig, method: Method) -> None:
    """ConfigError unless the method can use `augment.local_crops` local views: its loss takes them (DINO) and a
    ViT takes their size (timm's dynamic_img_size, a whole number of patches)."""
    n, size = cfg.augment.local_crops, local_crop_size(cfg.data.image_size, cfg.augment)
    if n == 0:
        return
    if not method.multi_crop:
        raise ConfigError(f"augment.local_crops: {n} local views are DINO's multi-crop; method.name={cfg.method.name} "
                          f"uses the two global views only: set augment.local_crops=0, or method.name=dino")
    if method.vit and not method.encoder.dynamic_img_size:  # model.kwargs.dynamic_img_size: false (else set)
        raise ConfigError(f"augment.local_crops: local views of {size} px need a ViT that takes other sizes than "
                          f"data.image_size {cfg.data.image_size}, and model.kwargs sets dynamic_img_size: false: "
                          f"remove it or set it true (timm then resamples the position embedding, as DINO's "
                          f"interpolate_pos_encoding), or set augment.local_crops=0")
    if method.vit and size % method.patch_size:
        raise ConfigError(f"augment.local_crop_size: local views of {size} px are not a whole number of "
                          f"{method.patch_size} px patches; set augment.local_crop_size to a multiple of "
                          f"{method.patch_size} (e.g. {max(1, round(size / method.patch_size)) * method.patch_size})")


def check_compile(cfg: PretrainConfig, method: Method, figures: bool) -> None:
    """ConfigError when `train.compile` would compile the encoder whose attention picks the kept patches (a method
    without a teacher reads its own encoder's): compiled blocks skip the forward hooks that read it."""
    reads = {"method.local.weight": method.local.on, "train.loc_every": cfg.train.loc_every > 0,
             "train.figure_samples": figures}
    if method.attention_encoder is method.encoder and any(reads.values()):
        keys = [k for k, on in reads.items() if on]
        raise ConfigError(f"train.compile: {cfg.method.name} ranks patches by its own encoder's attention ("
                          f"{', '.join(keys)}), which compiled blocks do not let forward hooks read; set "
                          f"train.compile=false, or set {' and '.join(f'{k}=0' for k in keys)}")


@torch.no_grad()
def mask_figure(model: Method, dataset, views: TwoViewPipeline, cfg: PretrainConfig, path: Path,
                title: str) -> None:
    """The two views of a few fixed training images and the patches the local branch keeps (or would keep)."""
    n = min(cfg.train.figure_samples, len(dataset))
    seeded = SeededDataset(dataset)
    indices = torch.linspace(0, len(dataset) - 1, n).long().tolist()
    items = [seeded[(i, sample_seed(cfg.seed, -1, i))][0] for i in indices]
    device = next(model.parameters()).device
    v1, v2, *_ = views.to_device([torch.stack(parts) for parts in zip(*items, strict=True)], device)
    keep = model.kept_patches(torch.cat([v1, v2])).chunk(2)
    v1, v2 = (denormalize(v, cfg.data.mean, cfg.data.std).cpu() for v in (v1, v2))
    save_mask_figure(v1, v2, keep[0].cpu(), keep[1].cpu(), model.patch_size, path, title)


def pretrain(cfg: PretrainConfig, check: bool = False, on_summary: Callable[[dict], None] | None = None) -> Path:
    """Runs (or resumes) a pretraining run; returns its run directory. The start-up summary goes to
    `on_summary` (main process) and into summary.json; `check` stops after it, before anything is written."""
    t = cfg.train
    cfg, local_note = local_view_sizes(cfg)
    run = open_run(cfg, cfg.output_dir, cfg.resume, make_accelerator(t.mixed_precision, t.grad_accum_steps), check)
    accelerator, run_dir = run.accelerator, run.run_dir

    views = two_view_pipeline(cfg.data.image_size, cfg.augment, cfg.data.mean, cfg.data.std,
                              resolve_augment_on(cfg.data.augment_on, accelerator.device, cfg.data.image_size))
    check_training_folder(cfg.data)
    dataset = build_dataset(cfg.data, cfg.data.train_split, views.transform)
    sampler, loader = run.loader(dataset, t.batch_size, t.grad_accum_steps)

    model = build_method(cfg.model, cfg.method, cfg.data.image_size)
    check_local_views(cfg, model)
    check_batch_norm(model, t.batch_size, accelerator.num_processes, ", run on more processes, or use method.name=dino "
                     "(no batch norm in its head)")
    if t.loc_every > 0:
        require_vit(model.encoder, cfg.model.name, "train.loc_every", "LoDisc keep precision logging",
                    "set train.loc_every=0, or use a ViT")
    figures = t.figure_samples > 0 and model.vit  # the patches the local branch keeps: a ViT's attention
    if t.compile:  # not the momentum encoder: its attention is read by forward hooks, which compiled code skips
        check_compile(cfg, model, figures)
        compile_modules(model.encoder.blocks if model.vit else [model.encoder], accelerator.device)
    if t.figure_samples > 0 and not model.vit and accelerator.is_main_process:
        log.info("train.figure_samples: no kept-patch figures: %s has no attention to keep patches by", cfg.model.name)
    per_epoch = steps_per_epoch(sampler, t.grad_accum_steps)
    global_batch = t.batch_size * accelerator.num_processes * t.grad_accum_steps
    schedules = build_schedules(cfg, model, t.epochs * per_epoch, global_batch, per_epoch)
    online_knn, online_loc, online_notes = online_evaluations(cfg, accelerator, dataset)
    summary = startup_summary(cfg.data, {cfg.data.train_split: dataset}, key_sources(cfg), {
        "steps": len(schedules["lr"]), "max_steps": t.max_steps, "epochs": t.epochs, "global_batch": global_batch,
        "lr": scaled_lr(cfg, global_batch), "warmup_steps": round(t.warmup_epochs * per_epoch),
        "num_processes": accelerator.num_processes, "init": cfg.model.weights or "scratch", "resume": cfg.resume,
        **model.summary(schedules),
        **pretrained_record(model.encoder), **online_notes, **token_grid(model.encoder),
        **method_facts(cfg, model.encoder), **local_note})
    if on_summary is not None and accelerator.is_main_process:
        on_summary(summary)
    if check:
        return run_dir
    optimizer = torch.optim.AdamW(model.param_groups(), lr=float(schedules["lr"][0]), betas=t.betas,
                                  weight_decay=t.weight_decay)
    model, optimizer = run.start(model, optimizer)
    method: Method = accelerator.unwrap_model(model)
    metrics = run.metrics(t.log_with, cfg)
    if accelerator.is_main_process and run.start_step == 0 and figures:
        mask_figure(method, dataset, views, cfg, run_dir / "figures" / "masks_start.png", "kept patches, step 0")

    if online_knn is not None and run.start_step == 0:  # with its raw-pixel floor, once
        metrics.log(0, {**online_knn(method.encoder), **online_knn.pixel_floor(method.encoder)})
    online_loc = online_loc if accelerator.is_main_process else None
    if online_loc is not None and run.start_step == 0:
        metrics.log(0, online_loc(method))

    def evaluate(s: int) -> None:  # after every step, applied or not: evaluation must not be lost
        if online_knn is not None and (s + 1) % (t.knn_every * per_epoch) == 0:
            metrics.log(s + 1, online_knn(method.encoder))
        if online_loc is not None and (s + 1) % (t.loc_every * per_epoch) == 0:
            metrics.log(s + 1, online_loc(method))

    state = run.loop_state(schedules)
    step = run.train(model, optimizer, loader, sampler, t, state, metrics,
                     lambda batch: model(*views.to_device(batch[0], accelerator.device)),  # device augments here
                     **method_hooks(method, schedules), evaluate=evaluate)

    if accelerator.is_main_process:
        export_backbone(method.encoder, cfg.model.name, method.timm_kwargs, run_dir,
                        eval_data_config(cfg.data.image_size, cfg.data.mean, cfg.data.std, FeatureConfig().crop_ratio))
        if figures:
            mask_figure(method, dataset, views, cfg, run_dir / "figures" / "masks_end.png",
                        f"kept patches, step {step}")
        summary |= {  # the start-up facts (epochs, global batch, processes, skipped images) are already in it
            "step": step, "total_steps": int(len(schedules["lr"])),
            **state.timing(),  # the whole run's, a resumed one's too
            "checkpoint": str(checkpoint_dirs(run_dir)[-1]),
        }
        write_json(run_dir / "summary.json", summary)
    # No end_training(): it destroys the process group, which a study's next arm in this process needs.
    accelerator.wait_for_everyone()
    run.close()
    return run_dir
