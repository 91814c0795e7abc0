"""The configuration schema: every key a recipe may set, with its type, default and, for numbers, the
allowed range (`bounded`), plus each class's `relations` between keys.

`sslfg.config.load_config(path, overrides, PretrainConfig)` fills these from YAML; an unknown key, a
value of the wrong type or out of its range, or a broken relation is an error that names the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from sslfg.config import AT_LEAST_1, IMAGE_SIDE, NON_NEGATIVE, POSITIVE, PROBABILITY, RATE, SEED, Relation, bounded
from sslfg.data.images import MAX_PIXELS
from sslfg.method_config import MethodConfig
from sslfg.models.backbone import sizes_near

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _patches(patch: int, size: int) -> int:
    """N, the patches of a square `size` image cut into `patch`-pixel squares."""
    return (size // patch) ** 2


PATCH_DIVIDES_IMAGE = Relation(
    ("model.patch_size", "data.image_size"), lambda patch, size: patch == 0 or size % patch == 0,
    "{0} must divide {1}: the last pixel rows and columns of every image would be cut off",
    lambda patch, size: f"use a data.image_size of {sizes_near(size, patch)}, or a patch size that divides {size}",
)

# timm's other poolings add parameters sslfg never runs (it reads the CLS token after the final norm): they get
# no gradient, which DDP refuses with several processes, and the option would silently change nothing
CLS_TOKEN_POOLING = Relation(
    ("kwargs",), lambda kwargs: kwargs.get("global_pool", "token") in ("token", ""),
    "{0}: global_pool must be 'token' (timm's default for ViTs) or '': LoDisc, GLSim and the features use the "
    "CLS token after the final norm, so avg (its fc_norm, which also drops that norm) or map (its attention "
    "pool) would leave parameters without gradient, which DDP rejects with several processes",
    lambda kwargs: f"remove global_pool ({kwargs['global_pool']!r}) from model.kwargs",
)


@dataclass
class DataConfig:
    """Where the images are and how they are laid out (METHODS §5)."""

    root: str = ""  # dataset folder; required for every real run
    # csv: <split>.csv of class_id,dir rows; imagefolder: root/<split>/<class>/<image>; folder: every image under
    # root, without labels; shards: tar shards written by python -m sslfg.data.shards (sslfg.data.shard_reader)
    format: Literal["csv", "imagefolder", "folder", "shards"] = "csv"
    images_dir: str = "images"  # csv layout: folder the `dir` column is relative to
    train_split: str = "train_val"  # csv: <split>.csv; imagefolder: root/<split>/
    val_split: str = "val"  # with a `train` split, what choices (the probe's lr, the fine-tuning init) are made on
    test_split: str = "test"  # the split the reported numbers are measured on
    num_classes: int = bounded(NON_NEGATIVE, 0)  # 0: infer from the data
    image_size: int = bounded(IMAGE_SIDE, 224)  # side of the square images the model sees, in pixels
    # per-channel mean of the pixels in [0, 1], for the normalisation (python -m sslfg.data.build.stats measures it)
    mean: tuple[float, float, float] = bounded("[0, 1]", IMAGENET_MEAN)
    std: tuple[float, float, float] = bounded("(0, 1]", IMAGENET_STD)  # per-channel std of the pixels in [0, 1]
    num_workers: int = bounded(NON_NEGATIVE, 4)  # loader worker processes per process; 0: load in the process
    # error: an unreadable image (missing, empty, truncated, undecodable) stops the run, naming file and row,
    # when it is reached; skip: every image is decoded once when the dataset is built, and the bad ones are
    # dropped, each logged, and counted in the run's metrics (data.skipped_images)
    on_bad_image: Literal["error", "skip"] = "error"
    # pretraining's two-view augmentation: workers (PIL, per image, in the loader workers), device (workers crop
    # and flip, the batch gets its colour, blur and solarize on the training device: sslfg.data.batch_augment),
    # auto (what bench/input_pipeline.py measured faster: device on a GPU; on a CPU up to 64 px: resolve_augment_on)
    augment_on: Literal["workers", "device", "auto"] = "auto"
    # an image with more pixels is refused before it is decoded (a decompression-bomb guard; the default is
    # PIL's limit, 2 x PIL.Image.MAX_IMAGE_PIXELS): raise it for trusted huge images
    max_image_pixels: int = bounded(AT_LEAST_1, MAX_PIXELS)
    # csv layout: every split csv has object-box columns x0,y0,x1,y1 (pixels of the original image, x1/y1 exclusive)
    boxes: bool = False
    # false: the images without their labels (csv: only the dir column is read; imagefolder: every image under
    # root/<split>, its folders not classes), for pretraining; format folder never has labels
    labels: bool = True


@dataclass
class EvalDataConfig:
    """The labelled dataset a pretraining run's online kNN (train.knn_every) and keep precision (train.loc_every)
    read instead of `data` (e.g. when `data` has no labels): the layout keys of `data`, read with labels and
    through the run's own data.image_size, mean and std. root "": `data` itself."""

    root: str = ""  # the labelled dataset's folder; "": `data` itself
    format: Literal["csv", "imagefolder", "shards"] = "csv"  # as data.format, labelled layouts only
    images_dir: str = "images"  # as data.images_dir
    train_split: str = "train_val"  # the online kNN's bank
    test_split: str = "test"  # its queries, and the keep precision's images
    num_classes: int = bounded(NON_NEGATIVE, 0)  # as data.num_classes
    boxes: bool = False  # as data.boxes; the keep precision (train.loc_every) needs them


@dataclass
class AugmentConfig:
    """Two-view BYOL-asymmetric augmentations (METHODS §1), and DINO's local views (multi-crop, §6)."""

    # RandomResizedCrop's range of the crop's area, as a fraction of the image's
    crop_scale: tuple[float, float] = bounded("(0, 1]", (0.08, 1.0), ordered=True)
    # brightness, contrast, saturation, hue (torchvision allows hue up to 0.5)
    jitter: tuple[float, float, float, float] = bounded((NON_NEGATIVE,) * 3 + ("[0, 0.5]",), (0.4, 0.4, 0.2, 0.1))
    jitter_p: float = bounded(PROBABILITY, 0.8)  # probability of the colour jitter
    grayscale_p: float = bounded(PROBABILITY, 0.2)  # probability of turning a view grey
    blur_p: tuple[float, float] = bounded(PROBABILITY, (1.0, 0.1))  # view 1, view 2
    blur_sigma: tuple[float, float] = bounded(POSITIVE, (0.1, 2.0), ordered=True)  # range of the blur's sigma, px
    solarize_p: tuple[float, float] = bounded(PROBABILITY, (0.0, 0.2))  # view 1, view 2
    flip_p: float = bounded(PROBABILITY, 0.5)  # probability of a horizontal flip
    # the crops' resampling: bilinear as MoCo v3 and LoDisc (torchvision's default), bicubic as DINO
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # multi-crop (DINO, METHODS §6): this many local views besides the two global ones (crop_scale); 0: none
    local_crops: int = bounded(NON_NEGATIVE, 0)
    local_crop_scale: tuple[float, float] = bounded("(0, 1]", (0.05, 0.4), ordered=True)  # DINO's
    local_crop_size: int = bounded(NON_NEGATIVE, 0)  # px; 0: DINO's 96 at 224 scaled, round(96/224 · S)
    local_blur_p: float = bounded(PROBABILITY, 0.5)  # DINO's local views: blur 0.5, no solarize


@dataclass
class ModelConfig:
    """The backbone every method trains (the method and its heads: `method`, sslfg.methods)."""

    name: str = "vit_small_patch16_224"  # any timm ViT; without the local branch any timm model (its pooled feature)
    patch_size: int = bounded(NON_NEGATIVE, 0)  # 0: the timm default for `name`
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (embed_dim, depth, ...)
    weights: str = ""  # local weights file (safetensors or a torch state dict); "" = from scratch
    # timm's weights for `name` (name.tag or hf-hub:org/repo) from the Hugging Face cache, downloaded if online
    pretrained: bool = False
    drop_path_rate: float = bounded(RATE, 0.0)  # stochastic depth of the student's blocks (the teacher has none)

    relations: ClassVar = (CLS_TOKEN_POOLING,)


@dataclass
class LoopConfig:
    """What the shared training loop reads: length, batching, precision, clipping, checkpoints."""

    epochs: int = bounded(AT_LEAST_1, 100)  # passes over the training split; the schedules span them
    # >0 stops after this many optimizer steps; schedules still follow `epochs`
    max_steps: int = bounded(NON_NEGATIVE, 0)
    batch_size: int = bounded(AT_LEAST_1, 256)  # per process
    grad_accum_steps: int = bounded(AT_LEAST_1, 1)  # batches per optimizer step
    clip_grad: float = bounded(NON_NEGATIVE, 0.0)  # 0: no clipping
    # global: one norm over all gradients (torch clip_grad_norm_); per_tensor: each tensor's own (DINO clip_gradients)
    clip_mode: Literal["global", "per_tensor"] = "global"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate's autocast; no: float32
    checkpoint_every: int = bounded(AT_LEAST_1, 500)  # optimizer steps
    keep_checkpoints: int = bounded(AT_LEAST_1, 2)  # the newest checkpoints kept; older ones are deleted
    log_every: int = bounded(AT_LEAST_1, 10)  # optimizer steps between metrics.jsonl lines
    # steps between the processes' agreement on a stop signal (sslfg.engine.preemption)
    stop_check_every: int = bounded(AT_LEAST_1, 10)
    # where metrics and the resolved config (as hyper-parameters) go, besides metrics.jsonl (sslfg.engine.metrics)
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "aim", "comet_ml"]] = field(
        default_factory=lambda: ["tensorboard"])


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining: the loop plus AdamW, its schedules and the EMA momentum (METHODS §1)."""

    base_lr: float = bounded(POSITIVE, 1.5e-4)  # lr = base_lr * global_batch / 256
    min_lr: float = bounded(NON_NEGATIVE, 0.0)  # the lr the cosine ends at
    warmup_epochs: float = bounded(NON_NEGATIVE, 0.0)  # linear lr warmup from 0, before the cosine
    weight_decay: float = bounded(NON_NEGATIVE, 0.1)  # AdamW's, at the start (see weight_decay_end)
    weight_decay_end: float = bounded("(-inf, inf)", -1.0)  # the cosine's end; <0: constant weight decay
    betas: tuple[float, float] = bounded(RATE, (0.9, 0.999))  # torch AdamW defaults, as MoCo v3
    # torch.compile the online encoder's blocks (forward and backward); on the CPU it needs a C++ compiler
    compile: bool = False
    figure_samples: int = bounded(NON_NEGATIVE, 6)  # training images in the mask figure; 0 disables it
    # online kNN (k 20) of the online encoder every n epochs and at step 0; 0: off
    knn_every: int = bounded(NON_NEGATIVE, 0)
    # at most this many bank and query images: `train` and data.val_split when the data has both, else
    # data.train_split and data.test_split (sslfg.evaluation.online.evaluation_data)
    knn_samples: int = bounded(AT_LEAST_1, 2000)
    # LoDisc keep precision (sslfg.evaluation.localisation) of the teacher encoder every n epochs and at step 0; 0: off
    loc_every: int = bounded(NON_NEGATIVE, 0)
    loc_samples: int = bounded(AT_LEAST_1, 500)  # at most this many images (with boxes) of the online kNN's queries

    relations: ClassVar = (
        Relation(("warmup_epochs", "epochs"), lambda warmup, epochs: warmup < epochs,
                 "{0} must be below {1}: the lr would never leave warmup",
                 lambda *_: "lower train.warmup_epochs or raise train.epochs"),
        # one process has the smallest global batch, hence the smallest lr; more processes only raise it
        Relation(("min_lr", "base_lr", "batch_size", "grad_accum_steps"),
                 lambda min_lr, base, batch, accum: min_lr <= base * batch * accum / 256,
                 "{0} must be at most the lr of one process, {1} · {2} · {3} / 256, or the cosine would rise",
                 lambda _, base, batch, accum: f"lower train.min_lr to at most {base * batch * accum / 256:g}"),
    )


@dataclass
class PretrainConfig:
    """Everything `train_ssl.py` reads."""

    output_dir: str = "runs/pretrain"  # the run directory: config.yaml, checkpoints, metrics, exported backbone
    seed: int = bounded(SEED, 0)  # of every random draw: weights, data order, augmentations
    resume: str = ""  # "" | "auto" | path to a checkpoint directory
    data: DataConfig = field(default_factory=DataConfig)
    eval_data: EvalDataConfig = field(default_factory=EvalDataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    relations: ClassVar = (
        PATCH_DIVIDES_IMAGE,
        Relation(("model.weights", "model.pretrained"), lambda weights, pretrained: not (weights and pretrained),
                 "{0} and {1} are two initialisations", lambda *_: "keep one of them"),
        # as sslfg.methods.local.num_kept: ⌊keep_ratio·N⌋, which would otherwise be raised to one patch silently
        Relation(("method.local.keep_ratio", "model.patch_size", "data.image_size"),
                 lambda keep, patch, size: patch == 0 or math.floor(keep * _patches(patch, size) + 1e-9) >= 1,
                 "{0} keeps no patch of the grid of {1} and {2}",
                 lambda _, patch, size: f"raise method.local.keep_ratio to at least {1 / _patches(patch, size):.3g} "
                                        f"(one of {_patches(patch, size)} patches)"),
    )
    # keys of earlier recipes -> their place now: sslfg.config names the new key instead of "unknown key"
    moved_keys: ClassVar = {
        "model.local_weight": "method.local.weight", "model.local_view": "method.local.view",
        "model.keep_ratio": "method.local.keep_ratio", "model.attention_layers": "method.local.attention_layers",
        **{f"model.{key}": f"method.mocov3.{key}" for key in (
            "temperature", "use_projector", "proj_hidden_dim", "pred_hidden_dim", "projector_dropout",
            "predictor_dropout")},
        "train.momentum": "method.mocov3.momentum (each method has its own: method.<name>.momentum)",
    }


@dataclass
class FeatureConfig:
    """Frozen features (METHODS §4): what is pooled and how it is computed and cached."""

    # final CLS; mean of patch tokens; last n blocks' CLS; raw normalised pixels (the floor)
    kind: Literal["cls", "mean", "lastn", "pixels"] = "cls"
    last_n: int = bounded(AT_LEAST_1, 4)  # kind lastn: the CLS of this many final blocks, concatenated
    batch_size: int = bounded(AT_LEAST_1, 256)  # per process
    crop_ratio: float = bounded("(0, 1]", 0.875)  # eval transform: resize to size/crop_ratio, centre crop
    cache: bool = True  # keep each split's features in <output_dir>/features, keyed by weights, images, settings
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: extract under bf16 autocast (part of the cache key)


@dataclass
class KnnConfig:
    """kNN classifier (DINO protocol) and leave-one-out retrieval (LoDisc protocol)."""

    ks: list[int] = bounded(AT_LEAST_1, factory=lambda: [10, 20, 100, 200])  # 1-NN is always reported
    temperature: float = bounded(POSITIVE, 0.07)  # T of the neighbours' vote weights exp(sim/T)
    # auto: faiss where it can search on the device (faiss-cpu on the CPU), else torch (so torch on a GPU)
    backend: Literal["auto", "faiss", "torch"] = "auto"
    float16: bool = False  # store the bank in float16: half the memory of a big bank, similarities to ~1e-3
    retrieval: bool = True  # also leave-one-out retrieval over the test split (top-1, top-5, mAP)
    figures: bool = True  # the test queries' nearest training images and the t-SNE map of the test features
    # also val.knn.*: bank train, queries the validation split or linear.val_fraction of train
    # (sslfg.evaluation.selection)
    val: bool = False


@dataclass
class LinearConfig:
    """Linear probe on the frozen backbone (LoDisc recipe)."""

    mode: Literal["fast", "full"] = "fast"  # fast: cached features, lr sweep; full: augmented images
    epochs: int = bounded(AT_LEAST_1, 100)  # of each head
    batch_size: int = bounded(AT_LEAST_1, 256)  # per process
    # fast mode: base lrs swept at once, each scaled by batch / 256 like `lr`
    lrs: list[float] = bounded(POSITIVE, factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    extend_grid: int = bounded(NON_NEGATIVE, 6)  # fast mode: most lrs swept past the end the chosen lr is at; 0: none
    lr: float = bounded(POSITIVE, 0.5)  # full mode: base lr, scaled by batch / 256
    momentum: float = bounded(RATE, 0.9)  # SGD's
    weight_decay: float = bounded(NON_NEGATIVE, 0.0)  # SGD's
    val_fraction: float = bounded("(0, 1)", 0.1)  # held out of the train split when the dataset has no val split
    resume: str = ""  # full mode: "" | "auto" | path to a checkpoint directory (as the pretraining `resume`)


@dataclass
class LocaliseConfig:
    """eval.localise: where a frozen backbone looks (sslfg.evaluation.localisation)."""

    # LoDisc's kept fraction, from the backbone's own CLS attention; unset: an evaluated run's method.local.keep_ratio
    keep_ratio: float = bounded("(0, 1]", 0.30)
    attention_layers: int = bounded(NON_NEGATIVE, 0)  # rank by the last n blocks; 0: every block
    top_k: int = bounded(AT_LEAST_1, 8)  # GLS patches that define the box (GLSim's default)
    figure_samples: int = bounded(NON_NEGATIVE, 6)  # test images in figures/localise.png; 0: no figure


@dataclass
class EmbedConfig:
    """eval.embed: the frozen features of one split as .npy shards (sslfg.evaluation.embed)."""

    split: str = ""  # the split to embed (a csv name or a folder); "": data.train_split; format folder: every image
    dtype: Literal["float16", "float32"] = "float32"  # float32: what faiss reads; float16: half the disk
    shard_size: int = bounded(AT_LEAST_1, 100_000)  # rows per .npy file, the unit a stopped run does not redo


@dataclass
class EvalConfig:
    """Everything `eval.knn`, `eval.linear`, `eval.localise` and `eval.embed` read."""

    checkpoint: str = ""  # an sslfg run directory or a weights file
    random_init: bool = False  # the floor: the checkpoint's (or model's) architecture, random weights
    pretrained: bool = False  # timm's weights for `model` from the Hugging Face cache (as model.pretrained)
    model: str = ""  # timm name; needed for a weights file or a random init without a run directory
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs of `model` (embed_dim, ...)
    output_dir: str = ""  # default: <run>/eval, or runs/eval/<model>-<init>
    output: str = ""  # also write the metrics JSON here
    seed: int = bounded(SEED, 0)  # of the random init, the held-out selection split and the figures
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    localise: LocaliseConfig = field(default_factory=LocaliseConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    relations: ClassVar = (
        Relation(("checkpoint", "pretrained"), lambda checkpoint, pretrained: not (checkpoint and pretrained),
                 "{0} and {1} are two sources of weights", lambda *_: "keep one of them"),
        Relation(("random_init", "pretrained"), lambda random, pretrained: not (random and pretrained),
                 "{0} and {1} contradict each other", lambda *_: "keep one of them"),
    )


@dataclass
class FinetuneModelConfig:
    """The classifier on the backbone: GLSim (METHODS §2) or the plain ViT CLS head."""

    head: Literal["glsim", "vit"] = "glsim"  # GLSim's head (METHODS §2) or a linear head on the CLS token
    name: str = "vit_base_patch16_224"  # timm name, used when `init` is a weights file or empty (scratch)
    patch_size: int = bounded(NON_NEGATIVE, 0)  # 0: the timm default for `name`
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (embed_dim, depth, ...)
    pretrained: bool = False  # with `init` empty: timm's weights for `name` (as the pretraining model.pretrained)
    drop_path_rate: float = bounded(RATE, 0.1)  # stochastic depth of the backbone's blocks
    top_k: int = bounded(AT_LEAST_1, 8)  # GLS patches that define the crop (16 for Stanford Dogs)
    crop_box: Literal["inclusive", "reference"] = "inclusive"  # reference: the original code's box
    label_smoothing: float = bounded(RATE, 0.1)  # of the cross-entropy
    adapter: Literal["none", "ila", "ila+", "ila++"] = "none"  # ILA (METHODS §3): frozen backbone + adapters
    adapter_width: int = bounded(AT_LEAST_1, 8)  # hidden width of each ILA adapter
    adapter_positions: list[int] = bounded(NON_NEGATIVE, factory=list)  # empty: after blocks depth/3-1 and 2·depth/3-1

    relations: ClassVar = (CLS_TOKEN_POOLING,)


@dataclass
class FinetuneAugmentConfig:
    """GLSim's fine-tuning augmentations: Resize(resize_ratio·S) + RandomCrop(S) for training,
    + CenterCrop(S) for testing."""

    resize_ratio: float = bounded(AT_LEAST_1, 1.34)  # the crop must fit in the resized image
    trivial_augment: bool = True  # torchvision's TrivialAugmentWide on training images
    random_erasing: float = bounded(PROBABILITY, 0.3)  # probability of RandomErasing on a training image
    flip: bool = True  # horizontal flip of training images


@dataclass
class FinetuneTrainConfig(LoopConfig):
    """Fine-tuning: the loop plus SGD Nesterov, warmup steps then cosine (GLSim recipe)."""

    epochs: int = bounded(AT_LEAST_1, 50)
    batch_size: int = bounded(AT_LEAST_1, 8)
    clip_grad: float = bounded(NON_NEGATIVE, 1.0)
    lr: float = bounded(POSITIVE, 0.01)  # SGD's lr after warmup, not scaled by the batch
    min_lr: float = bounded(NON_NEGATIVE, 1e-5)  # the lr the cosine ends at
    warmup_steps: int = bounded(NON_NEGATIVE, 500)  # must be fewer than the run's steps (checked at start)
    weight_decay: float = bounded(NON_NEGATIVE, 0.0)  # SGD's
    sgd_momentum: float = bounded(RATE, 0.9)  # SGD's
    nesterov: bool = True  # Nesterov momentum

    relations: ClassVar = (
        Relation(("min_lr", "lr"), lambda min_lr, lr: min_lr <= lr, "{0} must be at most {1}, or the cosine would rise",
                 lambda *_: "lower train.min_lr"),
    )


@dataclass
class FinetuneConfig:
    """Everything `eval.finetune` reads."""

    output_dir: str = "runs/finetune"  # the run directory: config.yaml, checkpoints, metrics
    seed: int = bounded(SEED, 0)  # of every random draw: head, data order, augmentations
    resume: str = ""  # "" | "auto" | path to a checkpoint directory
    init: str = ""  # an sslfg run directory, a weights file (with model.name), or "" for scratch
    eval_only: bool = False  # evaluate the newest checkpoint (or `resume`) on the test split
    data: DataConfig = field(default_factory=DataConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    relations: ClassVar = (
        PATCH_DIVIDES_IMAGE,
        Relation(("init", "model.pretrained"), lambda init, pretrained: not (init and pretrained),
                 "{0} and {1} are two initialisations", lambda *_: "keep one of them"),
        Relation(("model.top_k", "model.patch_size", "data.image_size"),
                 lambda k, patch, size: patch == 0 or k <= _patches(patch, size),
                 "{0} must be at most the number of patches of {1} and {2}",
                 lambda _, patch, size: f"lower model.top_k to at most {_patches(patch, size)}"),
    )


@dataclass
class StudyPretrainConfig:
    """The pretraining arms of a study: one recipe, per-arm overrides, one budget for all."""

    config: str = ""  # pretraining recipe every arm starts from
    # the budget: every arm trains this many epochs at the recipe's batch; 0: the recipe's
    epochs: int = bounded(NON_NEGATIVE, 0)
    # alternative budget: the epochs that fit this many minutes for all arms of one seed
    minutes: float = bounded(NON_NEGATIVE, 0.0)
    # every arm's lr warm-up in epochs (a shorter budget needs a shorter one: the recipe's must be below its
    # epochs); <0: the recipe's
    warmup_epochs: float = bounded("(-inf, inf)", -1.0)
    # arm name -> {dotted key: value} applied to the recipe (e.g. {method.local.weight: 0} for MoCo v3)
    arms: dict[str, Any] = field(default_factory=dict)

    relations: ClassVar = (
        Relation(("epochs", "minutes"), lambda epochs, minutes: not (epochs and minutes),
                 "{0} and {1} are two budgets, and the minutes would silently win",
                 lambda *_: "set one of them to 0"),
    )


@dataclass
class StudyEvalConfig:
    """The frozen-feature protocols run on every pretraining arm and the floors."""

    knn: list[str] = field(default_factory=list)  # extra key=value for eval.knn
    linear: list[str] = field(default_factory=list)  # extra key=value for eval.linear; [] with run_linear false
    run_linear: bool = True  # eval.linear on every pretraining arm and floor
    random_floor: bool = True  # random init of the same architecture, same protocols (raw pixels always run)


@dataclass
class StudyFinetuneConfig:
    """The fine-tuning arms: each starts from the best pretraining arm (by mean kNN k20) unless told."""

    epochs: int = bounded(NON_NEGATIVE, 0)  # the budget for every fine-tuning arm; 0: each recipe's
    # arm name -> {config: recipe, init: best | scratch | <pretraining arm>, dotted key: value, ...}
    arms: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudySupervisedConfig:
    """The supervised reference: the first pretraining arm's ViT trained from scratch with labels (eval.finetune,
    plain head) for as many epochs as each pretraining arm, then evaluated frozen like the arms: can this
    architecture learn the task at this budget at all?"""

    enabled: bool = True  # false: no supervised reference
    config: str = ""  # fine-tuning recipe (data, augmentation, optimiser); "": the first fine-tuning arm's
    settings: dict[str, Any] = field(default_factory=dict)  # dotted key: value; with config "", the first arm's


@dataclass
class StudyConfig:
    """Everything `python -m sslfg.study` reads: one dataset, one budget, seeds, and the arms."""

    output_dir: str = "runs/study"  # the study folder: seed<s>/ with every arm's runs, the report
    dataset: str = ""  # dataset recipe for the evaluations; the arms' recipes must name the same data.root
    # data keys set in the dataset recipe and in every arm, before the arm's own (e.g. {format: shards, root:
    # data/sample_shards} runs the study on a sharded copy of its data without copying the recipes)
    data: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = bounded(SEED, factory=lambda: [0])  # every arm runs once per seed
    pretrain: StudyPretrainConfig = field(default_factory=StudyPretrainConfig)
    evaluate: StudyEvalConfig = field(default_factory=StudyEvalConfig)
    finetune: StudyFinetuneConfig = field(default_factory=StudyFinetuneConfig)
    supervised: StudySupervisedConfig = field(default_factory=StudySupervisedConfig)
