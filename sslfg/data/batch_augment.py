"""The two-view augmentation (and DINO's local views) split in two (METHODS §1): loader workers decode, crop
and flip each image (uint8) and draw its photometric parameters; the training device applies colour jitter, grayscale,
Gaussian blur, solarization and normalisation to the whole batch at once (`data.augment_on: device`).

Workers draw with torch's CPU generator in exactly the order of `sslfg.data.transforms.TwoViewTransform`
(view 1's crop, flip, jitter, grayscale, blur, solarize, then view 2's, then each local view's), through the
same torchvision objects, so under one seed both paths pick the same crops and parameters; `SeededDataset` seeds that
generator per (seed, epoch, index), which keeps runs deterministic and resume exact on any number of
processes. The device half is per sample with no Python loop over the batch and no host sync; it
computes in float32 on images in [0, 1] (the PIL path rounds to 8 bits after every operation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv  # torchvision's own, batched

from sslfg.data.transforms import TwoViewTransform, blur_kernel_size, gaussian_kernel1d, geometric_steps, view_specs
from sslfg.schema import AugmentConfig

# One view's photometric parameters: a float32 row per image (workers draw it, the device applies it).
JITTER = 0  # 1: colour jitter applies (p aug.jitter_p)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 1, 2, 3, 4  # factors; neutral 1, 1, 1, 0 when not drawn
ORDER = slice(5, 9)  # torchvision's random order of the four: 0 brightness, 1 contrast, 2 saturation, 3 hue
GRAYSCALE, SIGMA, SOLARIZE = 9, 10, 11  # flags 0/1; SIGMA 0: no blur
NUM_PARAMS = 12
SOLARIZE_THRESHOLD = 128 / 255  # the worker path's 8-bit threshold 128
_FACTORS = {"brightness_factor": BRIGHTNESS, "contrast_factor": CONTRAST, "saturation_factor": SATURATION,
            "hue_factor": HUE}


def draw_view_params(aug: AugmentConfig, jitter: v2.ColorJitter, blur_p: float, solarize_p: float) -> torch.Tensor:
    """One view's parameters (NUM_PARAMS,) from torch's CPU generator, with torchvision's draws in
    TwoViewTransform's order: a transform with probability 0 draws nothing, a RandomApply one draws
    `rand(1) < p`, then its parameters (ColorJitter: the order, then each factor whose range is not a point)."""
    p = torch.zeros(NUM_PARAMS)
    p[[BRIGHTNESS, CONTRAST, SATURATION]] = 1.0
    p[ORDER] = torch.arange(4.0)
    if aug.jitter_p > 0 and torch.rand(1) < aug.jitter_p:
        drawn = jitter.make_params([])
        p[JITTER], p[ORDER] = 1.0, drawn["fn_idx"].float()
        for name, i in _FACTORS.items():
            if drawn[name] is not None:
                p[i] = drawn[name]
    if aug.grayscale_p > 0:
        p[GRAYSCALE] = float(torch.rand(1) < aug.grayscale_p)
    if blur_p > 0 and torch.rand(1) < blur_p:
        p[SIGMA] = torch.empty(1).uniform_(*aug.blur_sigma).item()  # v2.GaussianBlur's draw
    if solarize_p > 0:
        p[SOLARIZE] = float(torch.rand(1) < solarize_p)
    return p


class TwoViewCrops:
    """The workers' half: `__call__(img) -> (u1, u2, l1, ..., lN, params)`, each view's uint8 crop (RandomResizedCrop
    and flip as TwoViewTransform: the two global views (3, S, S), then the local ones) and their photometric
    parameters (2 + N, NUM_PARAMS)."""

    def __init__(self, image_size: int, aug: AugmentConfig) -> None:
        self.aug, self.jitter = aug, v2.ColorJitter(*aug.jitter)
        self.views = [(v2.Compose(geometric_steps(size, aug, scale)), blur_p, solarize_p)
                      for size, scale, blur_p, solarize_p in view_specs(image_size, aug)]

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, ...]:
        crops, params = [], []
        for geometry, blur_p, solarize_p in self.views:
            crops.append(TF.pil_to_tensor(geometry(img)))
            params.append(draw_view_params(self.aug, self.jitter, blur_p, solarize_p))
        return *crops, torch.stack(params)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1), to broadcast over images."""
    return values.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's luma (ITU-R 601-2) of (B, 3, H, W), as (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's blend, clamp(f·x + (1 − f)·other) with a factor per image; f = 1 returns x exactly."""
    f = _per_sample(factor)
    return (x * f + other * (1 - f)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue with a factor per image: rotate H in HSV by `hue` (B,) turns."""
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + hue.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def colour_jitter(x: torch.Tensor, p: torch.Tensor, hue: bool = True) -> torch.Tensor:
    """ColorJitter per image, in each image's own order (p[:, ORDER]). Brightness, contrast and saturation
    are one blend, clamp(f·x + (1 − f)·other), with other 0, the mean grey or the grey image. The costly
    hue rotation runs once for the batch: first every position before an image's hue blends with its
    op's factor there, then the hue, then the positions after it; a factor of 1 (a position on the other
    side of the hue, or jitter off) returns the image exactly. `hue=False` (jitter hue 0) skips the
    rotation, which torchvision then never runs."""
    order, on = p[:, ORDER].long(), p[:, JITTER] > 0
    hue_at = (order == 3).float().argmax(1)
    for phase in ("before", "after"):
        for k in range(3) if phase == "before" else range(1, 4):
            op = order[:, k]
            active = on & (op < 3) & ((k < hue_at) if phase == "before" else (k > hue_at))
            grey = grayscale(x)
            other = torch.where(_per_sample(op == 0), 0.0,
                                torch.where(_per_sample(op == 1), grey.mean((1, 2, 3), keepdim=True), grey))
            factor = p.gather(1, (BRIGHTNESS + op.clamp(max=2))[:, None])[:, 0]
            x = _blend(x, other, torch.where(active, factor, 1.0))
        if phase == "before" and hue:
            x = torch.where(_per_sample(on), adjust_hue(x, p[:, HUE]), x)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """torchvision's GaussianBlur (kernel blur_kernel_size(H), reflect padding) with a sigma per image,
    as two 1-D passes of shifted sums; sigma 0 is a unit kernel, which returns the image exactly. Shifted
    sums in a fixed order, not a grouped convolution: the same bits on every run and device."""
    size = blur_kernel_size(x.shape[-2])
    kernel = torch.where((sigma > 0)[:, None], gaussian_kernel1d(size, sigma.clamp(min=1e-6)),
                         F.one_hot(torch.tensor(size // 2, device=x.device), size).float())  # (B, size)
    half = size // 2
    for dim in (-1, -2):  # rows, then columns, as torchvision's separable kernel
        padded = F.pad(x, (half, half, 0, 0) if dim == -1 else (0, 0, half, half), mode="reflect")
        out = torch.zeros_like(x)
        for t in range(size):
            out.addcmul_(_per_sample(kernel[:, t]), padded.narrow(dim, t, x.shape[dim]))
        x = out
    return x


def photometric(u8: torch.Tensor, p: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                hue: bool = True) -> torch.Tensor:
    """One view of a batch: uint8 crops (B, 3, S, S) and their parameters (B, NUM_PARAMS) -> the normalised
    float32 view, as TwoViewTransform's jitter, grayscale, blur, solarize, ToDtype and Normalize."""
    x = TF.to_dtype(u8, torch.float32, scale=True)  # torchvision's own, as the worker path
    x = colour_jitter(x, p, hue)
    x = torch.where(_per_sample(p[:, GRAYSCALE] > 0), grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, p[:, SIGMA])
    x = torch.where(_per_sample(p[:, SOLARIZE] > 0) & (x >= SOLARIZE_THRESHOLD), 1 - x, x)
    return TF.normalize(x, list(mean), list(std))


AugmentOn = Literal["workers", "device"]


CPU_DEVICE_MAX_SIZE = 64  # auto on a CPU: the batched path up to this image size, PIL workers above


def resolve_augment_on(setting: str, device: torch.device, image_size: int) -> AugmentOn:
    """`data.augment_on`; `auto` picks what bench/input_pipeline.py measured faster (bench/README.md). On a
    GPU: device, the photometric work leaves the loader workers altogether. On a CPU, per core, both views:
    batched 2.95x faster than PIL at 28 px (the sample recipe), 0.75x at 112 px and 0.42x at 224 px, where
    the blur (kernel ~S/10) and hue on every pixel outweigh PIL's per-image overhead: device up to
    CPU_DEVICE_MAX_SIZE, workers above."""
    if setting != "auto":
        return "workers" if setting == "workers" else "device"
    return "device" if device.type == "cuda" or image_size <= CPU_DEVICE_MAX_SIZE else "workers"


@dataclass
class TwoViewPipeline:
    """The per-image `transform` for the dataset and `to_device`, which turns a collated batch of its
    outputs into the normalised views on the device: the two global ones (B, 3, S, S), then the local ones."""

    transform: Any
    augment_on: AugmentOn
    mean: Sequence[float]
    std: Sequence[float]
    hue: bool

    def to_device(self, views: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
        if self.augment_on == "workers":
            return tuple(v.to(device, non_blocking=True) for v in views)
        *crops, params = (v.to(device, non_blocking=True) for v in views)
        with torch.autocast(device.type, enabled=False):  # float32 whatever the run's mixed precision
            return tuple(photometric(u, params[:, i], self.mean, self.std, self.hue) for i, u in enumerate(crops))


def two_view_pipeline(image_size: int, aug: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                      augment_on: AugmentOn) -> TwoViewPipeline:
    """TwoViewTransform in the workers, or TwoViewCrops in the workers and `photometric` on the device."""
    transform = (TwoViewTransform(image_size, aug, mean, std) if augment_on == "workers"
                 else TwoViewCrops(image_size, aug))
    return TwoViewPipeline(transform, augment_on, tuple(mean), tuple(std), aug.jitter_p > 0 and aug.jitter[3] > 0)
