"""Fine-tuning with the GLSim head or the plain ViT head (METHODS §2) on the shared training loop.

Called by `sslfg.commands.finetune` (`python -m eval.finetune`, `sslfg-finetune`); importable so that studies and
tests run it in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from sslfg.config import ConfigError, check_warmup, key_sources
from sslfg.data.datasets import build_dataset
from sslfg.data.transforms import denormalize, eval_data_config, finetune_transforms
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.loop import steps_per_epoch
from sslfg.engine.run import open_run
from sslfg.engine.schedules import cosine_schedule
from sslfg.evaluation.localisation import finetune_test_boxes, glsim_localisation
from sslfg.figures import save_crop_figure
from sslfg.files import write_json
from sslfg.models.backbone import forward_tokens, require_vit, timm_kwargs
from sslfg.models.glsim import GLSim, ViTClassifier, classification_loss, gls_scores
from sslfg.models.heads import check_batch_norm
from sslfg.models.ila import attach_ila, count_parameters, final_grid
from sslfg.schema import FeatureConfig, FinetuneConfig
from sslfg.summary import startup_summary, token_grid
from sslfg.verdicts import correct_path, write_correct
from sslfg.weights import backbone_source, create_backbone, export_backbone, pretrained_record

log = logging.getLogger(__name__)

THROUGHPUT_BATCHES = (1, 64)


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """GLSim or ViTClassifier on the backbone named by `init`, and what to record about it."""
    m = cfg.model
    name, kwargs, weights = backbone_source(cfg.init, m.name, timm_kwargs(cfg.data.image_size, m.patch_size, m.kwargs))
    kwargs = {**kwargs, "img_size": cfg.data.image_size}
    # drop path: timm's ramp for a non-ViT; a ViT's blocks all get the same rate (GLSim's recipe) from the classifier
    vit, kwargs = create_backbone(name, kwargs, weights, m.drop_path_rate, key="init", pretrained=m.pretrained)
    if m.head == "glsim":
        require_vit(vit, name, "model.head", "GLSim (model.head=glsim)", "use model.head=vit, the plain head")
    if m.adapter != "none":
        require_vit(vit, name, "model.adapter", f"ILA ({m.adapter} adapters)", "set model.adapter=none")
    dp = m.drop_path_rate
    model = (GLSim(vit, num_classes, k=m.top_k, box=m.crop_box, drop_path_rate=dp) if m.head == "glsim"
             else ViTClassifier(vit, num_classes, drop_path_rate=dp))
    if m.adapter != "none":  # after GLSim (whose aggregator copies the plain block's kind); freezes the backbone
        attach_ila(vit, variant=m.adapter, width=m.adapter_width, positions=m.adapter_positions or None)
        if m.head == "glsim" and m.top_k > final_grid(vit) ** 2:
            raise ConfigError(f"model.top_k: {m.top_k} is more than the {final_grid(vit) ** 2} patches left after "
                              f"the {m.adapter} adapters")
    trainable, total = count_parameters(model)
    return model, {"backbone": name, "backbone_kwargs": kwargs, "init": weights or "scratch", "head": m.head,
                   "adapter": m.adapter, "params.trainable": trainable, "params.total": total, **pretrained_record(vit)}


@torch.no_grad()
def test_accuracy(model: nn.Module, dataset, accelerator: Accelerator, batch_size: int, num_workers: int) -> dict:
    """Test top-1, top-5, per-class and mean per-class accuracy (in [0, 1]) over every process, the
    number of test images they cover, and which ones the model got right ("hits")."""
    loader = accelerator.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, num_workers=num_workers))
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(images).float()
        logits, labels = accelerator.gather_for_metrics((logits.contiguous(), labels.to(logits.device)))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train(was_training)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = logits.argmax(1) == labels
    per_class = {int(c): correct[labels == c].float().mean().item() for c in labels.unique()}
    return {
        "top1": correct.float().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).float().mean().item(),
        "mean_per_class": sum(per_class.values()) / len(per_class),
        "per_class": per_class,
        "samples": len(labels),  # each test image once, however many processes evaluated it
        "hits": correct,  # (N,) bool, in dataset order: the per-image record of sslfg.verdicts
    }


@torch.no_grad()
def throughput(model: nn.Module, image_size: int, accelerator: Accelerator, batch: int, repeats: int = 3) -> float:
    """Inference images/s at a batch size, on random images, after one warm-up pass, under the run's
    autocast (bf16/fp16 inference is what the run's precision promises; fp32 would understate it)."""
    model.eval()
    device = accelerator.device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with accelerator.autocast():
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batch * repeats / (time.perf_counter() - tic)


@torch.no_grad()
def crop_figure(model: GLSim, dataset, cfg: FinetuneConfig, device: torch.device, path: Path, n: int = 6) -> None:
    """Test images with the GLS box, the crop the second pass sees, and the patch-similarity heat map."""
    model.eval()
    indices = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    images = torch.stack([dataset[i][0] for i in indices]).to(device)
    out = model(images, return_crops=True)
    scores = gls_scores(forward_tokens(model.encoder, images), model.encoder.num_prefix_tokens)
    show = [denormalize(t, cfg.data.mean, cfg.data.std).cpu() for t in (images, out["crops"])]
    save_crop_figure(show[0], out["boxes"].cpu(), show[1], scores.cpu(), cfg.model.top_k, path)


def finetune(cfg: FinetuneConfig, check: bool = False, on_summary: Callable[[dict], None] | None = None,
             on_metrics: Callable[[dict[str, float], Path], None] | None = None) -> Path:
    """Trains (or resumes, or with `eval_only` only tests) a classifier; returns the run directory. On the
    main process the start-up summary goes to `on_summary` (and into metrics.json), the test top-1, top-5
    and mean per-class accuracy and their file to `on_metrics`; `check` stops after the summary, before
    anything is written."""
    t = cfg.train
    resume = cfg.resume or ("auto" if cfg.eval_only else "")
    run = open_run(cfg, cfg.output_dir, resume, make_accelerator(t.mixed_precision, t.grad_accum_steps), check,
                   write_config=not cfg.eval_only, kind="finetune")
    accelerator, run_dir = run.accelerator, run.run_dir
    if cfg.eval_only and run.resume_from is None:
        raise ConfigError(f"eval_only: no checkpoint in {run_dir / 'checkpoints'}; train first or set resume=PATH")

    train_tf, test_tf = finetune_transforms(cfg.data.image_size, cfg.augment, cfg.data.mean, cfg.data.std)
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train_tf)
    test_ds = build_dataset(cfg.data, cfg.data.test_split, test_tf)
    num_classes = cfg.data.num_classes or max(train_ds.num_classes, test_ds.num_classes)
    model, info = build_classifier(cfg, num_classes)
    check_batch_norm(model, t.batch_size, accelerator.num_processes)
    sampler, loader = run.loader(train_ds, t.batch_size, t.grad_accum_steps)
    total = t.epochs * steps_per_epoch(sampler, t.grad_accum_steps)
    if not cfg.eval_only:
        check_warmup(cfg, "train.warmup_steps", total)
    schedules = {"lr": cosine_schedule(t.lr, t.min_lr, total, warmup_steps=t.warmup_steps),
                 "weight_decay": cosine_schedule(t.weight_decay, t.weight_decay, total)}
    log.info("%s head, adapter %s: %d trainable of %d parameters", cfg.model.head, cfg.model.adapter,
             info["params.trainable"], info["params.total"])
    summary = startup_summary(cfg.data, {cfg.data.train_split: train_ds, cfg.data.test_split: test_ds},
                              key_sources(cfg), {
        "num_classes": num_classes, "steps": total, "max_steps": t.max_steps, "epochs": t.epochs,
        "global_batch": t.batch_size * accelerator.num_processes * t.grad_accum_steps, "lr": t.lr,
        "warmup_steps": min(t.warmup_steps, total), "num_processes": accelerator.num_processes,
        "init": info["init"], "head": cfg.model.head, "adapter": cfg.model.adapter, "resume": resume,
        "eval_only": cfg.eval_only, **token_grid(model.encoder),
        **({"model.top_k": cfg.model.top_k} if cfg.model.head == "glsim" else {})})
    if on_summary is not None and accelerator.is_main_process:
        on_summary(summary)
    if check:
        return run_dir
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                                momentum=t.sgd_momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    model, optimizer = run.start(model, optimizer, "testing" if cfg.eval_only else "resuming")
    step = run.start_step

    timing = {}
    if not cfg.eval_only:
        metrics_log = run.metrics(t.log_with, cfg)

        def compute_loss(batch):
            images, labels = (b.to(accelerator.device, non_blocking=True) for b in batch)
            return {"loss": classification_loss(model(images), labels, cfg.model.label_smoothing)}

        state = run.loop_state(schedules, lr_key="train.lr")
        step = run.train(model, optimizer, loader, sampler, t, state, metrics_log, compute_loss)
        timing = {f"train.{k}": v for k, v in state.timing().items()}

    result = test_accuracy(model, test_ds, accelerator, t.batch_size, cfg.data.num_workers)
    hits = result.pop("hits")
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model)
        write_correct(correct_path(run_dir, "test"), cfg.data.test_split, {"test.top1": hits})
        if cfg.model.adapter == "none" and not cfg.eval_only:  # a plain ViT: eval.knn/linear can read it frozen
            d = cfg.data  # the preprocessing of the frozen evaluations, as a pretraining run records it
            export_backbone(net.encoder, info["backbone"], info["backbone_kwargs"], run_dir,
                            eval_data_config(d.image_size, d.mean, d.std, FeatureConfig().crop_ratio))
        speed = {f"images_per_second.batch{b}": round(throughput(net, cfg.data.image_size, accelerator, b), 1)
                 for b in THROUGHPUT_BATCHES}
        # the summary holds epochs, num_classes and data.skipped_images (dropped by data.on_bad_image=skip)
        record = {**summary, "dataset": cfg.data.root, "train_split": cfg.data.train_split,
                  "test_split": cfg.data.test_split, "seed": cfg.seed, "step": step, **info,
                  **{f"test.{k}": v for k, v in result.items()}, **speed, **timing}
        if isinstance(net, GLSim) and test_ds.boxes is not None:  # where its crops land (sslfg.evaluation.localisation)
            boxes = finetune_test_boxes(test_ds, cfg.data.image_size, cfg.augment.resize_ratio)
            record |= glsim_localisation(net, test_ds, boxes, accelerator.device, t.batch_size)
        name = f"eval_step_{step:08d}.json" if cfg.eval_only else "metrics.json"
        path = write_json(run_dir / name, record)
        if on_metrics is not None:
            on_metrics({f"test.{k}": result[k] for k in ("top1", "top5", "mean_per_class")}, path)
        if isinstance(net, GLSim):
            crop_figure(net, test_ds, cfg, accelerator.device, run_dir / "figures" / "gls_crops.png")
    accelerator.wait_for_everyone()
    run.close()
    return run_dir
