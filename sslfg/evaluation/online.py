"""The evaluations during pretraining, on bounded subsets of labelled held-out data every few epochs, so that a
user sees progress (or collapse) while training rather than after it: the online kNN and the keep precision.
They read the validation pair when the data has one: a recipe chosen by its learning curves is then not chosen on
the test split."""

from __future__ import annotations

import copy
import dataclasses

import torch
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import Dataset, Subset

from sslfg.config import ConfigError
from sslfg.data.boxes import eval_boxes
from sslfg.evaluation.features import FeatureKind, extract_features
from sslfg.evaluation.knn import knn_evaluate
from sslfg.evaluation.localisation import keep_metrics
from sslfg.evaluation.run import EvalDatasets
from sslfg.evaluation.selection import selection_splits
from sslfg.methods import Method
from sslfg.models.backbone import grid_size
from sslfg.schema import DataConfig, FeatureConfig, PretrainConfig

K = 20
CROP_RATIO = FeatureConfig().crop_ratio  # the evaluations' resize + centre crop


def evaluation_data(cfg: PretrainConfig) -> DataConfig:
    """What the online evaluations read, as its train_split (the kNN bank) and test_split (the kNN queries and the
    keep precision's images): `eval_data`'s labelled dataset and splits at the run's image size and normalisation
    when eval_data.root is set; else `data` with the selection pair (`train` → data.val_split,
    `sslfg.evaluation.selection`) when it has both and val is not the test split, otherwise `data` as it is."""
    if cfg.eval_data.root:
        return dataclasses.replace(cfg.data, **dataclasses.asdict(cfg.eval_data), labels=True)
    d = cfg.data
    # selection_splits refuses val = test (a choice); the online evaluations then read `data` as it is
    pair = selection_splits(d) if d.val_split != d.test_split else None
    return d if pair is None else dataclasses.replace(d, train_split=pair[0], test_split=pair[1])


def evaluation_datasets(cfg: PretrainConfig, train: Dataset | None = None) -> EvalDatasets:
    """The labelled splits the online evaluations read, each built once for both (with `on_bad_image=skip` building
    one decodes every image) at the evaluation resize and centre crop. `train`: the pretraining's own train split,
    reused with that transform when the evaluations read `data` (no eval_data.root) rather than read again."""
    datasets = EvalDatasets(evaluation_data(cfg), CROP_RATIO, "eval_data" if cfg.eval_data.root else "data")
    if train is not None and not cfg.eval_data.root and datasets.data.train_split == cfg.data.train_split:
        datasets[cfg.data.train_split] = copy.copy(train)
        datasets[cfg.data.train_split].transform = datasets.transform
    return datasets


PIXEL_FLOOR_BYTES = 2**30  # the raw-pixel floor's features, bank and queries together, in float32


class OnlineKnn:
    """kNN top-1 (k 20, DINO protocol, CLS features) of up to `train.knn_samples` evenly spaced
    query images against as many bank images, of `evaluation_data` (labelled); `datasets`: its
    `evaluation_datasets` when already built. `pixel_floor` is the same kNN on the raw pixels: the line a
    learning curve must cross."""

    def __init__(self, cfg: PretrainConfig, accelerator: Accelerator, datasets: EvalDatasets | None = None) -> None:
        datasets = evaluation_datasets(cfg) if datasets is None else datasets
        bank, queries = datasets[datasets.data.train_split], datasets[datasets.data.test_split]
        self.bank, self.queries = (evenly_spaced(d, cfg.train.knn_samples) for d in (bank, queries))
        if len(self.bank) < K:  # a smaller bank would answer k 20 with fewer neighbours under the k20 name
            raise ConfigError(f"train.knn_samples: the online kNN (k {K}) needs at least {K} bank images, got "
                              f"{len(self.bank)} (train.knn_samples={cfg.train.knn_samples}, {len(bank)} in "
                              f"{bank.source}); raise train.knn_samples or set train.knn_every=0")
        self.accelerator = accelerator
        self.batch_size = cfg.train.batch_size

    def __call__(self, vit: VisionTransformer, kind: FeatureKind = "cls") -> dict[str, float]:
        # Its own RNG state: evaluating must not change the training run's random stream.
        with torch.random.fork_rng(devices=[]):
            bank, bank_labels, queries, labels = (
                t for d in (self.bank, self.queries)
                for t in extract_features(vit, d, self.accelerator, self.batch_size, num_workers=0, kind=kind,
                                          desc="online knn")
            )
        vit.train()
        top1 = knn_evaluate(bank, bank_labels, queries, labels, ks=[K], backend="torch")[f"knn.k{K}.top1"]
        return {f"online_knn{'' if kind == 'cls' else '.' + kind}.k{K}.top1": top1}

    def pixel_floor(self, vit: VisionTransformer) -> dict[str, float]:
        """{"online_knn.pixels.k20.top1": the kNN of the normalised images themselves}, or {} when their features
        would take more than PIXEL_FLOOR_BYTES (about 1,800 images of 3x224x224: lower train.knn_samples)."""
        image = self.bank[0][0]
        if (len(self.bank) + len(self.queries)) * image.numel() * 4 > PIXEL_FLOOR_BYTES:
            return {}
        return self(vit, "pixels")


def evenly_spaced(dataset, n: int) -> Subset:
    """`n` images of `dataset` spread evenly over it (all when it has fewer)."""
    return Subset(dataset, torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist())


class OnlineLocalisation:
    """LoDisc keep precision during pretraining: the patches the method's attention encoder keeps (the teacher's, or
    the encoder's own for a method without one) by its attention at method.local.keep_ratio, also with the local
    branch off, so that arms compare at equal budget, on up to `train.loc_samples` evenly spaced images of
    `evaluation_data`'s test_split, eval-transformed (not augmented); `datasets`: the `evaluation_datasets` when
    already built."""

    def __init__(self, cfg: PretrainConfig, datasets: EvalDatasets | None = None) -> None:
        datasets = evaluation_datasets(cfg) if datasets is None else datasets
        d = datasets.data
        dataset = datasets[d.test_split]
        if dataset.boxes is None:
            raise ConfigError(f"train.loc_every: keep precision needs object boxes, and the split '{d.test_split}' "
                              f"of {d.root} it reads has none; add box columns or set train.loc_every=0")
        subset = evenly_spaced(dataset, cfg.train.loc_samples)  # the online kNN's choice of images
        self.images = torch.stack([image for image, _ in subset])
        self.boxes = eval_boxes(dataset, d.image_size, CROP_RATIO)[subset.indices]
        self.batch_size = cfg.train.batch_size

    @torch.no_grad()
    def __call__(self, model: Method) -> dict[str, float]:
        encoder = model.attention_encoder
        was_training = encoder.training
        device = next(encoder.parameters()).device
        # Eval mode (no drop path) and its own RNG state: measuring must not change the training run.
        with torch.random.fork_rng(devices=[]):
            encoder.eval()
            keep = torch.cat([model.kept_patches(x.to(device)).cpu() for x in self.images.split(self.batch_size)])
            encoder.train(was_training)
        grid = grid_size(encoder)
        return keep_metrics(keep, self.boxes, grid, self.images.shape[-1] / grid, prefix="online_loc.")
