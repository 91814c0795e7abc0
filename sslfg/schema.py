"""The configuration schema: every key a recipe may set, with its type and default.

`sslfg.config.load_config(path, overrides, PretrainConfig)` fills these from YAML; an unknown key
or a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Where the images are and how they are laid out (METHODS §5)."""

    root: str = ""  # dataset folder; required for every real run
    format: Literal["csv", "imagefolder", "folder"] = "csv"
    images_dir: str = "images"  # csv layout: folder the `dir` column is relative to
    train_split: str = "train_val"  # csv: <split>.csv; imagefolder: root/<split>/
    val_split: str = "val"
    test_split: str = "test"
    num_classes: int = 0  # 0: infer from the data
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_workers: int = 4
    # error: an unreadable image (missing, empty, truncated, undecodable) stops the run, naming file and row,
    # when it is reached; skip: every image is decoded once when the dataset is built, and the bad ones are
    # dropped, each logged, and counted in the run's metrics (data.skipped_images)
    on_bad_image: Literal["error", "skip"] = "error"


@dataclass
class AugmentConfig:
    """Two-view BYOL-asymmetric augmentations (METHODS §1)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)  # view 1, view 2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    flip_p: float = 0.5


@dataclass
class ModelConfig:
    """Backbone plus the LoDisc method (METHODS §1)."""

    name: str = "vit_small_patch16_224"  # any timm ViT
    patch_size: int = 0  # 0: the timm default for `name`
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (embed_dim, depth, ...)
    weights: str = ""  # local weights file (safetensors or a torch state dict); "" = from scratch
    drop_path_rate: float = 0.0
    use_projector: bool = True  # false reproduces the reference code, which never runs it
    proj_hidden_dim: int = 4096
    pred_hidden_dim: int = 4096
    projector_dropout: float = 0.2  # LoDisc's Dropout after each hidden layer of the projector
    predictor_dropout: float = 0.2
    temperature: float = 0.2
    local_weight: float = 1.0  # 0 gives plain MoCo v3
    local_view: Literal["zero_fill", "drop_tokens"] = "zero_fill"
    keep_ratio: float = 0.30
    attention_layers: int = 0  # the location score sums the last n blocks' CLS attention; 0: every block (LoDisc)


@dataclass
class LoopConfig:
    """What the shared training loop reads: length, batching, precision, clipping, checkpoints."""

    epochs: int = 100
    max_steps: int = 0  # >0 stops after this many optimizer steps; schedules still follow `epochs`
    batch_size: int = 256  # per process
    grad_accum_steps: int = 1
    clip_grad: float = 0.0  # 0: no clipping
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 500  # optimizer steps
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclass
class TrainConfig(LoopConfig):
    """Pretraining: the loop plus AdamW, its schedules and the EMA momentum (METHODS §1)."""

    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.1
    weight_decay_end: float = -1.0  # <0: constant weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # torch AdamW defaults, as MoCo v3
    momentum: float = 0.99  # EMA m0, cosine to 1
    figure_samples: int = 6  # training images in the mask figure; 0 disables it
    knn_every: int = 0  # online kNN (k 20) of the online encoder every n epochs and at step 0; 0: off
    knn_samples: int = 2000  # at most this many bank (data.train_split) and query (data.test_split) images


@dataclass
class PretrainConfig:
    """Everything `train_ssl.py` reads."""

    output_dir: str = "runs/pretrain"
    seed: int = 0
    resume: str = ""  # "" | "auto" | path to a checkpoint directory
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class FeatureConfig:
    """Frozen features (METHODS §4): what is pooled and how it is computed and cached."""

    # final CLS; mean of patch tokens; last n blocks' CLS; raw normalised pixels (the floor)
    kind: Literal["cls", "mean", "lastn", "pixels"] = "cls"
    last_n: int = 4
    batch_size: int = 256  # per process
    crop_ratio: float = 0.875  # eval transform: resize to size/crop_ratio, centre crop
    cache: bool = True


@dataclass
class KnnConfig:
    """kNN classifier (DINO protocol) and leave-one-out retrieval (LoDisc protocol)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # 1-NN is always reported
    temperature: float = 0.07
    backend: Literal["faiss", "torch"] = "faiss"
    retrieval: bool = True
    figures: bool = True


@dataclass
class LinearConfig:
    """Linear probe on the frozen backbone (LoDisc recipe)."""

    mode: Literal["fast", "full"] = "fast"  # fast: cached features, lr sweep; full: augmented images
    epochs: int = 100
    batch_size: int = 256
    # fast mode: base lrs swept at once, each scaled by batch / 256 like `lr`
    lrs: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0])
    lr: float = 0.5  # full mode: base lr, scaled by batch / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # held out of the train split when the dataset has no val split
    resume: str = ""  # full mode: "" | "auto" | path to a checkpoint directory (as the pretraining `resume`)


@dataclass
class EvalConfig:
    """Everything `eval.knn` and `eval.linear` read."""

    checkpoint: str = ""  # an sslfg run directory or a weights file
    random_init: bool = False  # the floor: the checkpoint's (or model's) architecture, random weights
    model: str = ""  # timm name; needed for a weights file or a random init without a run directory
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    output_dir: str = ""  # default: <run>/eval, or runs/eval/<model>-<init>
    output: str = ""  # also write the metrics JSON here
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)


@dataclass
class FinetuneModelConfig:
    """The classifier on the backbone: GLSim (METHODS §2) or the plain ViT CLS head."""

    head: Literal["glsim", "vit"] = "glsim"
    name: str = "vit_base_patch16_224"  # timm name, used when `init` is a weights file or empty (scratch)
    patch_size: int = 0
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.1
    top_k: int = 8  # GLS patches that define the crop (16 for Stanford Dogs)
    crop_box: Literal["inclusive", "reference"] = "inclusive"  # reference: the original code's box
    label_smoothing: float = 0.1
    adapter: Literal["none", "ila", "ila+", "ila++"] = "none"  # ILA (METHODS §3): frozen backbone + adapters
    adapter_width: int = 8
    adapter_positions: list[int] = field(default_factory=list)  # empty: after blocks depth/3-1 and 2·depth/3-1


@dataclass
class FinetuneAugmentConfig:
    """GLSim's fine-tuning augmentations: Resize(resize_ratio·S) + RandomCrop(S) for training,
    + CenterCrop(S) for testing."""

    resize_ratio: float = 1.34
    trivial_augment: bool = True
    random_erasing: float = 0.3
    flip: bool = True


@dataclass
class FinetuneTrainConfig(LoopConfig):
    """Fine-tuning: the loop plus SGD Nesterov, warmup steps then cosine (GLSim recipe)."""

    epochs: int = 50
    batch_size: int = 8
    clip_grad: float = 1.0
    lr: float = 0.01
    min_lr: float = 1e-5
    warmup_steps: int = 500
    weight_decay: float = 0.0
    sgd_momentum: float = 0.9
    nesterov: bool = True


@dataclass
class FinetuneConfig:
    """Everything `eval.finetune` reads."""

    output_dir: str = "runs/finetune"
    seed: int = 0
    resume: str = ""  # "" | "auto" | path to a checkpoint directory
    init: str = ""  # an sslfg run directory, a weights file (with model.name), or "" for scratch
    eval_only: bool = False  # evaluate the newest checkpoint (or `resume`) on the test split
    data: DataConfig = field(default_factory=DataConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)


@dataclass
class StudyPretrainConfig:
    """The pretraining arms of a study: one recipe, per-arm overrides, one budget for all."""

    config: str = ""  # pretraining recipe every arm starts from
    epochs: int = 0  # the budget: every arm trains this many epochs at the recipe's batch; 0: the recipe's
    minutes: float = 0.0  # alternative budget: the epochs that fit this many minutes for all arms of one seed
    # arm name -> {dotted key: value} applied to the recipe (e.g. {model.local_weight: 0} for MoCo v3)
    arms: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyEvalConfig:
    """The frozen-feature protocols run on every pretraining arm and the floors."""

    knn: list[str] = field(default_factory=list)  # extra key=value for eval.knn
    linear: list[str] = field(default_factory=list)  # extra key=value for eval.linear; [] with run_linear false
    run_linear: bool = True
    random_floor: bool = True  # random init of the same architecture, same protocols
    pixel_floor_max_dim: int = 4096  # raw-pixel kNN when 3·S·S is at most this (small images only)


@dataclass
class StudyFinetuneConfig:
    """The fine-tuning arms: each starts from the best pretraining arm (by mean kNN k20) unless told."""

    epochs: int = 0  # the budget for every fine-tuning arm; 0: each recipe's
    # arm name -> {config: recipe, init: best | scratch | <pretraining arm>, dotted key: value, ...}
    arms: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    """Everything `python -m sslfg.study` reads: one dataset, one budget, seeds, and the arms."""

    output_dir: str = "runs/study"
    dataset: str = ""  # dataset recipe for the evaluations; the arms' recipes must name the same data.root
    seeds: list[int] = field(default_factory=lambda: [0])
    pretrain: StudyPretrainConfig = field(default_factory=StudyPretrainConfig)
    evaluate: StudyEvalConfig = field(default_factory=StudyEvalConfig)
    finetune: StudyFinetuneConfig = field(default_factory=StudyFinetuneConfig)
