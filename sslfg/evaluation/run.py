"""What the frozen-feature evaluations share: config, backbone, splits, features, start-up summary, metrics file,
and the run of an eval command from its arguments to its metrics (`run_evaluation`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslfg.cli import parse_eval_cli, print_metrics, print_summary
from sslfg.config import COMMAND_LINE, ConfigError, key_sources, load_config
from sslfg.data.datasets import build_dataset, in_section
from sslfg.data.images import DataError
from sslfg.data.transforms import eval_transform
from sslfg.engine.accelerator import make_accelerator
from sslfg.engine.checkpoint import STATE_FILE
from sslfg.engine.rundir import (
    LOCK_FILE,
    RUN_CONFIG,
    check_output_dir,
    claim_run_dir,
    data_roots,
    ensure_writable,
    read_run_file,
    release_run_dir,
)
from sslfg.evaluation.features import cached_features
from sslfg.files import write_json
from sslfg.models.backbone import require_vit
from sslfg.schema import DataConfig, EvalConfig, EvalDataConfig, FinetuneConfig, PretrainConfig
from sslfg.summary import SCHEMA_DEFAULT, key_origins, startup_summary, token_grid
from sslfg.weights import backbone_source, create_backbone, pretrained_record

PIXELS = "pixels"  # features.kind whose feature is the normalised image itself: no network, no weights

# the other processes wait at a barrier while the main one runs kNN, retrieval and t-SNE alone
EVAL_TIMEOUT_S = 6 * 3600

# (cfg, backbone, accelerator, output dir, datasets) -> (metrics, protocol) on the main process, None elsewhere
Measure = Callable[[EvalConfig, VisionTransformer, Accelerator, Path, "EvalDatasets"], "tuple[dict, dict] | None"]
# (cfg, backbone, number of processes, datasets by split) -> the command's own facts of its start-up summary
Schedule = Callable[[EvalConfig, VisionTransformer, int, dict[str, Any]], dict[str, Any]]
# (cfg, datasets by split) -> None, or a DataError for data the evaluation cannot use, before any work
CheckData = Callable[[EvalConfig, dict[str, Any]], None]


def backbone_spec(cfg: EvalConfig) -> tuple[str, dict[str, Any], str]:
    """(timm name, kwargs at the dataset's image size, weights file) of the backbone, without building it."""
    if cfg.features.kind == PIXELS:
        return "none", {}, ""
    if not cfg.checkpoint and not ((cfg.random_init or cfg.pretrained) and cfg.model):
        raise ConfigError("checkpoint: give --checkpoint (run dir or weights file), --model NAME --pretrained "
                          "(timm's weights), or --random-init --model NAME")
    name, kwargs, weights = backbone_source(cfg.checkpoint, cfg.model, cfg.model_kwargs, key="checkpoint")
    return name, {**kwargs, "img_size": cfg.data.image_size}, weights


def build_backbone(cfg: EvalConfig) -> tuple[VisionTransformer, dict[str, Any]]:
    """The frozen backbone at the dataset's image size, and what to record about it."""
    name, kwargs, weights = backbone_spec(cfg)
    if cfg.features.kind == PIXELS:  # pool_features returns the image; the identity stands in for the network
        return nn.Identity(), {"backbone": name, "backbone_kwargs": kwargs, "checkpoint": cfg.checkpoint,
                               "init": "none (raw pixels)"}
    torch.manual_seed(cfg.seed)
    vit, kwargs = create_backbone(name, kwargs, weights="" if cfg.random_init else weights, key="checkpoint",
                                  name_key="--model", pretrained=cfg.pretrained, kwargs_key="model_kwargs")
    if cfg.features.kind in ("mean", "lastn"):
        require_vit(vit, name, "features.kind", f"the '{cfg.features.kind}' feature", "use features.kind=cls (its "
                    "pooled feature)")
    init = "random" if cfg.random_init else weights
    return vit, {"backbone": name, "backbone_kwargs": kwargs, "checkpoint": cfg.checkpoint, "init": init,
                 **pretrained_record(vit)}


def run_folder(cfg: EvalConfig) -> Path | None:
    """The run --checkpoint names: itself, or the run of a checkpoint folder; None without --checkpoint."""
    run = Path(cfg.checkpoint) if cfg.checkpoint else None
    return run.parent.parent if run is not None and (run / STATE_FILE).is_file() else run


def read_run_config(config: Path) -> dict[str, Any]:
    """The evaluated run's config.yaml; one error when it is damaged."""
    return read_run_file(config, "give the data with --dataset configs/datasets/<name>.yaml (and the backbone's "
                         "weights file with --model) instead, or write the file again from the recipe the run "
                         "was started with")


def run_key_defaults(cfg: EvalConfig, sources: dict[str, str], keys: dict[str, str]) -> EvalConfig:
    """Each key of `keys` (an EvalConfig key -> a key of the evaluated run's config.yaml) that no file or override
    sets takes the run's own value, e.g. localise.keep_ratio the run's method.local.keep_ratio, when --checkpoint is
    a run (or one of its checkpoints) whose config.yaml has that key; `sources` notes where it came from."""
    run = run_folder(cfg)
    config = run / RUN_CONFIG if run is not None else None
    if config is None or not config.is_file():
        return cfg
    raw = read_run_config(config)
    for key, run_key in keys.items():
        value = raw
        for part in run_key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if key in sources or value is None:
            continue
        section, name = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
        sources[key] = f"{config} (the run's {run_key})"
    return cfg


def run_data_defaults(cfg: EvalConfig) -> tuple[EvalConfig, dict[str, str], str]:
    """When --checkpoint is a run directory (or one of its checkpoints) and no recipe file names data.root
    (nothing does, or only `data.root=` on the command line: the run's kind of data in another folder), every
    data.* key that no file or override sets comes from <run>/config.yaml, the image size and normalisation
    included (a run folder without one is a ConfigError saying so); a --dataset or --config that names
    data.root describes other data and keeps the schema defaults. Returns the config, where each key came
    from (as `key_sources`) and a line for the start-up summary saying which data keys came from where."""
    sources = key_sources(cfg)
    run = run_folder(cfg)
    run_config = run / RUN_CONFIG if run is not None else None
    if "data.root" not in sources and run is not None and run.is_dir() and not run_config.is_file():
        raise ConfigError(f"checkpoint: the run folder '{run}' has no {RUN_CONFIG}, so its data settings are unknown; "
                          "give the data with --dataset configs/datasets/<name>.yaml or data.root=PATH")
    if sources.get("data.root", COMMAND_LINE) == COMMAND_LINE and run_config is not None and run_config.is_file():
        # a pretraining or a fine-tuning run (the study's supervised reference); only the latter has `init`
        kind = FinetuneConfig if "init" in read_run_config(run_config) else PretrainConfig
        run_data = load_config(run_config, [], kind).data
        # data.labels=false withheld the labels of the run's own images; another folder is read with its own, and
        # in a layout without box columns (a folder of photos to embed) without the run's data.boxes
        own = ("labels",) if "data.root" in sources else ()
        own += ("boxes",) if "data.format" in sources and cfg.data.format not in ("csv", "shards") else ()
        inherited = {f.name: getattr(run_data, f.name) for f in dataclasses.fields(run_data)
                     if f"data.{f.name}" not in sources and f.name not in own}
        sources |= {f"data.{name}": str(run_config) for name in inherited}
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **inherited))
    return cfg, sources, key_origins(sources, [f"data.{f.name}" for f in dataclasses.fields(cfg.data)])


def output_dir(cfg: EvalConfig, info: dict[str, Any]) -> Path:
    """`output_dir`, else <run>/eval (eval-random, eval-pixels) for a run directory, <run>/eval-step_N for its
    checkpoint folder step_N (which holds the checkpoint's files and nothing else), else runs/eval/pixels or
    runs/eval/<model>-<init>; `info` needs "backbone" (the timm name)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    pixels = cfg.features.kind == PIXELS
    if ckpt is not None and ckpt.is_dir():
        name = "eval-pixels" if pixels else "eval-random" if cfg.random_init else "eval"
        return ckpt.parent.parent / f"{name}-{ckpt.name}" if (ckpt / STATE_FILE).is_file() else ckpt / name
    if pixels:
        return Path("runs/eval/pixels")
    init = "random" if cfg.random_init else "pretrained" if cfg.pretrained else ckpt.stem
    return Path("runs/eval") / f"{info['backbone'].replace('/', '--')}-{init}"


def eval_output_dir(cfg: EvalConfig) -> Path:
    """`output_dir` of an evaluation command (`run_evaluation`), before its backbone is built."""
    return output_dir(cfg, {"backbone": backbone_spec(cfg)[0]})


class EvalDatasets(dict):
    """The splits one evaluation reads, by name, each built on first use and then kept: its listing is read,
    its images checked (with data.on_bad_image=skip, decoded) and its warnings logged once per command. They
    carry the evaluation transform (resize + centre crop at `crop_ratio`, an eval command's features.crop_ratio).
    `section`: the config section `data` comes from, whose keys an error names."""

    def __init__(self, data: DataConfig, crop_ratio: float, section: str = "data") -> None:
        super().__init__()
        self.data, self.transform = data, eval_transform(data.image_size, data.mean, data.std, crop_ratio)
        self.section = section

    def __missing__(self, split: str) -> Any:
        try:
            self[split] = build_dataset(self.data, split, self.transform)
        except DataError as e:
            if self.section == "data":
                raise
            # the keys the section sets are named as its own (eval_data.root); the rest it takes from data
            keys = (f.name for f in dataclasses.fields(EvalDataConfig))
            raise DataError(in_section(str(e), self.section, keys)) from None
        return self[split]


def split_features(cfg: EvalConfig, vit: VisionTransformer, accelerator: Accelerator, datasets: EvalDatasets,
                   split: str, out_dir: Path) -> tuple[Tensor, Tensor, Any]:
    """Features, labels and the dataset of one split, through the feature cache."""
    dataset = datasets[split]
    f = cfg.features
    features, labels = cached_features(
        vit, dataset, split, out_dir / "features" if f.cache else None, accelerator, f.batch_size,
        cfg.data.num_workers, f.kind, f.last_n, f.precision,
    )
    return features, labels, dataset


def skipped_images(*datasets: Any) -> int:
    """Images data.on_bad_image=skip dropped from these datasets; evaluators put it in their protocol
    as "skipped_images", which `record` files as "data.skipped_images"."""
    return sum(len(d.skipped) for d in datasets)


def record(cfg: EvalConfig, info: dict[str, Any], protocol: dict[str, Any], metrics: dict[str, float]) -> dict:
    """The flat metrics object: metric keys (values in [0, 1]) plus what produced them, including
    "data.skipped_images", the images data.on_bad_image=skip dropped from the splits used."""
    return {
        "dataset": cfg.data.root, "format": cfg.data.format, "image_size": cfg.data.image_size,
        "feature": cfg.features.kind, "seed": cfg.seed, "data.on_bad_image": cfg.data.on_bad_image,
        "data.skipped_images": protocol.get("skipped_images", 0), **info,
        **{f"protocol.{k}": v for k, v in protocol.items() if k != "skipped_images"}, **metrics,
    }


def write_metrics(out_dir: Path, name: str, data: dict, extra: str = "") -> Path:
    """Writes <out_dir>/<name>.json (and `extra` when set) atomically, making their folders."""
    if extra:
        write_json(Path(extra), data)
    return write_json(out_dir / f"{name}.json", data)


def check_metrics_file(path: str, name: str, reads: Sequence[str], own: Path) -> None:
    """ConfigError for an `output` (--output) that eval.<name> must not write its metrics JSON to: not a .json
    name, a folder, an existing file that is not a metrics file of eval.<name> (a command never overwrites a file
    it did not write: a backbone, a config, a dataset's csv), a path inside another run's folder (one with a
    run's lock file, other than this command's own output folder `own`: a study arm's knn.json is another run's
    result), or a path inside a dataset or checkpoint folder."""
    target, example = Path(path), f"--output results/{name}.json"
    if target.suffix != ".json" or target.is_dir():
        what = "a folder" if target.is_dir() else "not a .json file name"
        raise ConfigError(f"output: '{path}' is {what}; --output names the file that also gets the metrics JSON, "
                          f"e.g. {example} (output_dir names the folder)")
    if target.exists():
        try:
            ours = json.loads(target.read_text()).get("command") == name
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"output: '{path}' exists and is not a metrics file of eval.{name}, and a command never "
                              "overwrites a file it did not write; choose another path or move the file away")
    own, folder = own.resolve(), target.resolve().parent
    run = next((f for f in (folder, *folder.parents) if f == own or (f / LOCK_FILE).is_file()), own)
    if run != own:
        raise ConfigError(f"output: '{path}' is inside '{run}', the folder of another sslfg run (it holds "
                          f"{LOCK_FILE}), and a command never writes into a run's folder it does not own; choose a "
                          f"path outside it, e.g. {example}")
    check_output_dir(target, "output", reads, example, shared=True)


def run_evaluation(argv: Sequence[str] | None, description: str, name: str, measure: Measure,
                   schedule: Schedule | None = None, needs_labels: bool = True,
                   check_data: CheckData | None = None, needs_vit: str = "",
                   run_keys: dict[str, str] | None = None) -> dict:
    """Config (data keys from the run's own config.yaml: `run_data_defaults`), accelerator, frozen
    backbone and the train/test datasets (labelled, unless not `needs_labels`), which `check_data` may
    refuse (with --check too); prints the start-up summary (and stops there with --check); `measure`
    returns (metrics, protocol) on the main process (None elsewhere); the result, with the summary, is
    written to <output_dir>/<name>.json and printed. `needs_vit` (what of `measure` reads a ViT's
    attention or tokens) refuses another backbone at start-up. `run_keys` (as `run_key_defaults`) come from the
    evaluated run unless set; the summary gives each one's source."""
    args = parse_eval_cli(argv, description)
    cfg, sources, data_note = run_data_defaults(load_config(args.files, args.overrides, EvalConfig))
    run_keys = run_keys or {}
    cfg = run_key_defaults(cfg, sources, run_keys)
    accelerator = make_accelerator(timeout_s=EVAL_TIMEOUT_S)
    out = eval_output_dir(cfg)
    # output_dir set empty (an unset variable?) is refused, as one inside the data
    check_output_dir(cfg.output_dir if "output_dir" in sources else out, reads=data_roots(cfg))
    if cfg.output:
        check_metrics_file(cfg.output, name, data_roots(cfg), out)
    if not args.check:  # before any time is spent
        ensure_writable(out)
        if accelerator.is_main_process:
            claim_run_dir(out, "eval")
        if cfg.output:
            ensure_writable(Path(cfg.output).parent, "output", create=False)
    vit, info = build_backbone(cfg)
    datasets = EvalDatasets(cfg.data, cfg.features.crop_ratio)
    splits = {split: datasets[split] for split in (cfg.data.train_split, cfg.data.test_split)}
    unlabelled = [d.source for d in splits.values() if d.num_classes == 0]
    if needs_labels and unlabelled:
        raise ConfigError(f"eval.{name} needs labelled images, and {unlabelled[0]} has no labels (data.format="
                          f"{cfg.data.format}, data.labels={str(cfg.data.labels).lower()}): evaluate on a labelled "
                          "dataset (--dataset PATH or data.root=...), or write these images' features with "
                          "sslfg-embed (python -m eval.embed)")
    if needs_vit and cfg.features.kind != PIXELS:  # the backbone first; check_data says what raw pixels lack
        require_vit(vit, info["backbone"], "checkpoint", needs_vit, "evaluate a ViT backbone")
    if check_data is not None:
        check_data(cfg, splits)
    world = accelerator.num_processes
    facts = {"data.settings": data_note, "command": name, "num_processes": world, "init": info["init"],
             "backbone": info["backbone"], "features": cfg.features.kind,
             **token_grid(vit),
             "features.global_batch": cfg.features.batch_size * world, "features.crop_ratio": cfg.features.crop_ratio}
    facts |= schedule(cfg, vit, world, datasets) if schedule else {}
    facts |= {f"{key}.source": sources.get(key, SCHEMA_DEFAULT) for key in run_keys}
    summary = startup_summary(cfg.data, splits, sources, facts)
    if accelerator.is_main_process:
        print_summary(summary)
    if args.check:
        return summary
    produced = measure(cfg, vit, accelerator, out, datasets)
    result: dict = {}
    if accelerator.is_main_process and produced is not None:
        metrics, protocol = produced
        result = summary | record(cfg, info, protocol, metrics)
        print_metrics(metrics, write_metrics(out, name, result, cfg.output))
    accelerator.wait_for_everyone()
    release_run_dir(out)
    return result
