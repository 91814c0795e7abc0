"""Image transforms: the two-view SSL augmentation (METHODS §1), the fine-tuning recipe (§2), the
linear-probe augmentation and the evaluation transform.

Every random choice comes from torch's global RNG (torchvision.transforms.v2 draws with
torch.rand / torch.randint / Tensor.uniform_, never with Python's `random`), so seeding torch's
CPU generator per sample (`sslfg.data.loader.SeededDataset`) reproduces the augmentations
exactly on resume. Resampling is bilinear, as in MoCo v3 and LoDisc (torchvision's default), except the
fine-tuning recipe's bicubic resize (GLSim) and the pretraining crops under `augment.interpolation: bicubic`
(DINO); PIL resizing antialiases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from sslfg.schema import AugmentConfig, FinetuneAugmentConfig

INTERPOLATION = InterpolationMode.BILINEAR
FINETUNE_INTERPOLATION = InterpolationMode.BICUBIC  # GLSim's train and test Resize
ERASING_SCALE = (0.02, 0.4)  # GLSim's RandomErasing: erased area fraction (torchvision: 0.02–0.33)
ERASING_RATIO = (0.3, 3.3)  # and aspect ratio


def blur_kernel_size(image_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the image side, at least 3 (23 at 224, as in BYOL)."""
    k = round(0.1 * image_size)
    return max(3, k + 1 - k % 2)


class SeparableGaussianBlur(v2.GaussianBlur):
    """torchvision's GaussianBlur computed as two 1-D convolutions on PIL L/RGB images.

    Same sigma draw (torch RNG, in `make_params`), same kernel and reflect padding as
    torchvision, so outputs match it to within 1 grey level of rounding; about 5x faster at
    kernel 23 (2.6 ms against 13 ms for 224x224 RGB on one CPU thread). Other inputs (tensors,
    other PIL modes) go to torchvision unchanged.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not (isinstance(inpt, Image.Image) and inpt.mode in ("L", "RGB")):
            return super().transform(inpt, params)
        kx, ky = self.kernel_size
        sx, sy = params["sigma"]
        x = torch.from_numpy(np.array(inpt, dtype=np.float32))  # (H, W) or (H, W, C)
        x = (x[None] if x.ndim == 2 else x.permute(2, 0, 1))[None]  # (1, C, H, W)
        c = x.shape[1]
        x = F.pad(x, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
        x = F.conv2d(x, gaussian_kernel1d(kx, sx).view(1, 1, 1, kx).expand(c, 1, 1, kx), groups=c)
        x = F.conv2d(x, gaussian_kernel1d(ky, sy).view(1, 1, ky, 1).expand(c, 1, ky, 1), groups=c)
        out = x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(out[..., 0] if inpt.mode == "L" else out)


def gaussian_kernel1d(size: int, sigma: float | torch.Tensor) -> torch.Tensor:
    """Normalised 1-D Gaussian over offsets -(size-1)/2 .. (size-1)/2 (torchvision's kernel); a tensor of
    sigmas (B,) gives one kernel per row, (B, size)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    x = torch.arange(size, dtype=torch.float32, device=sigma.device) - (size - 1) / 2
    return torch.softmax(-0.5 * (x / sigma[..., None]) ** 2, dim=-1)


class TwoViewTransform:
    """BYOL-asymmetric two-view augmentation, and DINO's local views: `__call__(img) -> (v1, v2, l1, ..., lN)`.

    Global views: RandomResizedCrop(S, scale=aug.crop_scale), horizontal flip (aug.flip_p),
    ColorJitter(*aug.jitter) with p aug.jitter_p, grayscale (aug.grayscale_p), Gaussian blur
    (kernel `blur_kernel_size(S)`, sigma in aug.blur_sigma) with p aug.blur_p[i], solarize
    (threshold 128 on the 8-bit image) with p aug.solarize_p[i], then float32 in [0, 1] and
    Normalize(mean, std). The blur is `SeparableGaussianBlur` (torchvision's, computed faster).
    The views differ only in blur and solarize probabilities (by default view 1 is always blurred
    and never solarized). Then aug.local_crops local views (`local_crop_size`, scale aug.local_crop_scale,
    blur p aug.local_blur_p, no solarize, as DINO's). Each view draws after the one before it from the generator
    `SeededDataset` seeds per (seed, epoch, index), so view k's draws are a function of (seed, epoch, index, k)
    and adding local views leaves the global ones as they were. Input: a PIL RGB image; outputs: (3, S, S) and
    (3, s, s) float32 tensors.
    """

    def __init__(
        self,
        image_size: int,
        aug: AugmentConfig,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.views = tuple(_view(size, aug, mean, std, blur_p, solarize_p, scale)
                           for size, scale, blur_p, solarize_p in view_specs(image_size, aug))

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(view(img) for view in self.views)

    def __repr__(self) -> str:
        views = "".join(f"\n  view{i + 1}={v}," for i, v in enumerate(self.views))
        return f"{type(self).__name__}({views[:-1]})"


def local_crop_size(image_size: int, aug: AugmentConfig) -> int:
    """The local views' side: aug.local_crop_size, or DINO's 96 px at 224 scaled to the image, round(96/224 · S)."""
    return aug.local_crop_size or round(image_size * 96 / 224)


def view_specs(image_size: int, aug: AugmentConfig) -> list[tuple[int, tuple[float, float], float, float]]:
    """(size, crop scale, blur p, solarize p) of each view: the two global ones, then the local ones."""
    local = (local_crop_size(image_size, aug), tuple(aug.local_crop_scale), aug.local_blur_p, 0.0)
    return [*((image_size, tuple(aug.crop_scale), b, s) for b, s in zip(aug.blur_p, aug.solarize_p, strict=True)),
            *[local] * aug.local_crops]


def geometric_steps(size: int, aug: AugmentConfig, scale: tuple[float, float] | None = None) -> list[v2.Transform]:
    """The geometric head of a view: RandomResizedCrop(S, scale, aug.interpolation) (scale: aug.crop_scale unless
    given) and, unless flip_p is 0, a horizontal flip."""
    steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=scale or tuple(aug.crop_scale),
                                                      interpolation=InterpolationMode(aug.interpolation))]
    if aug.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(aug.flip_p))
    return steps


def _view(
    size: int,
    aug: AugmentConfig,
    mean: Sequence[float],
    std: Sequence[float],
    blur_p: float,
    solarize_p: float,
    scale: tuple[float, float],
) -> v2.Compose:
    """One view's pipeline; transforms with probability 0 are left out (cheaper, clearer repr). The
    random draws come in the order `sslfg.data.batch_augment.TwoViewCrops` repeats."""
    steps = geometric_steps(size, aug, scale)
    if aug.jitter_p > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(*aug.jitter)], p=aug.jitter_p))
    if aug.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(aug.grayscale_p))
    if blur_p > 0:
        blur = SeparableGaussianBlur(blur_kernel_size(size), sigma=tuple(aug.blur_sigma))
        steps.append(v2.RandomApply([blur], p=blur_p))
    if solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))  # PIL image: 8-bit threshold
    return v2.Compose([*steps, *_to_normalized_tensor(mean, std)])


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 0.875
) -> v2.Compose:
    """Resize the short side to round(S / crop_ratio), centre-crop S: PIL image -> (3, S, S) float32."""
    return v2.Compose(
        [
            v2.Resize(round(image_size / crop_ratio), interpolation=INTERPOLATION),
            v2.CenterCrop(image_size),
            *_to_normalized_tensor(mean, std),
        ]
    )


def eval_data_config(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 0.875
) -> dict[str, Any]:
    """`eval_transform`'s preprocessing in the keys of timm's pretrained_cfg, which `timm.data.resolve_data_config`
    reads: what a user of exported weights should feed them."""
    return {"input_size": [3, image_size, image_size], "mean": list(mean), "std": list(std), "crop_pct": crop_ratio,
            "crop_mode": "center", "interpolation": INTERPOLATION.value}


def finetune_transforms(
    image_size: int, aug: FinetuneAugmentConfig, mean: Sequence[float], std: Sequence[float]
) -> tuple[v2.Compose, v2.Compose]:
    """GLSim's fine-tuning pair (train, test), as its reference builds them: both resize (bicubic) to a
    square of resize_ratio·S; train then takes a RandomCrop(S), flip, TrivialAugmentWide (torchvision's
    default nearest interpolation) and, after Normalize, RandomErasing (scale ERASING_SCALE, ratio
    ERASING_RATIO); test takes the CenterCrop(S)."""
    side = round(aug.resize_ratio * image_size)
    resize = v2.Resize((side, side), interpolation=FINETUNE_INTERPOLATION)
    train: list[v2.Transform] = [resize, v2.RandomCrop(image_size)]
    if aug.flip:
        train.append(v2.RandomHorizontalFlip())
    if aug.trivial_augment:
        train.append(v2.TrivialAugmentWide())
    train += _to_normalized_tensor(mean, std)
    if aug.random_erasing > 0:
        train.append(v2.RandomErasing(p=aug.random_erasing, scale=ERASING_SCALE, ratio=ERASING_RATIO))
    test = [resize, v2.CenterCrop(image_size), *_to_normalized_tensor(mean, std)]
    return v2.Compose(train), v2.Compose(test)


def crop_flip_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """LoDisc's linear-probe augmentation: RandomResizedCrop(S, scale 0.08–1) and a horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(image_size, interpolation=INTERPOLATION), v2.RandomHorizontalFlip(),
                       *_to_normalized_tensor(mean, std)])


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """PIL image -> float32 tensor in [0, 1] -> (x - mean) / std per channel."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo Normalize for display: x (..., 3, H, W) -> x * std + mean, clamped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp(0, 1)
