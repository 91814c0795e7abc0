"""Two-view SSL transform (shapes, asymmetry, torch-seeded determinism), eval transform, GLSim fine-tuning pair."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from sslfg.config import load_config
from sslfg.data.transforms import (
    SeparableGaussianBlur,
    TwoViewTransform,
    blur_kernel_size,
    denormalize,
    eval_transform,
    finetune_transforms,
)
from sslfg.schema import AugmentConfig, FinetuneAugmentConfig, FinetuneConfig

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _image(h: int = 40, w: int = 50, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _normalized(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def _only(**kwargs) -> AugmentConfig:
    """Every augmentation off (full-image crop, no flip/jitter/grey/blur/solarize), then `kwargs`."""
    off = dict(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0),
               solarize_p=(0.0, 0.0))
    return AugmentConfig(**{**off, **kwargs})


def test_two_views_shape_and_dtype() -> None:
    v1, v2_ = TwoViewTransform(32, AugmentConfig(), MEAN, STD)(_image())
    for v in (v1, v2_):
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
    assert not torch.equal(v1, v2_)


def test_views_depend_only_on_the_torch_seed() -> None:
    transform, img = TwoViewTransform(32, AugmentConfig(), MEAN, STD), _image()

    def views(seed: int, python_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        random.seed(python_seed)  # Python's RNG must play no part
        with torch.random.fork_rng(devices=[]):  # as the training loop does per sample
            torch.manual_seed(seed)
            return transform(img)

    a, b, c = views(7, 1), views(7, 2), views(8, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_solarize_only_in_view_2_when_configured() -> None:
    img = _image(32, 32)
    v1, v2_ = TwoViewTransform(32, _only(solarize_p=(0.0, 1.0)), MEAN, STD)(img)
    assert torch.allclose(v1, _normalized(img), atol=1e-6)
    assert torch.allclose(v2_, _normalized(ImageOps.solarize(img, 128)), atol=1e-6)


def test_blur_only_in_view_1_when_configured() -> None:
    img = _image(32, 32)
    torch.manual_seed(0)
    v1, v2_ = TwoViewTransform(32, _only(blur_p=(1.0, 0.0)), MEAN, STD)(img)
    assert torch.allclose(v2_, _normalized(img), atol=1e-6)
    assert (v1 - v2_).abs().mean() > 0.05  # noise image: blurring changes it a lot
    assert v1.std() < v2_.std()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_separable_blur_matches_torchvision(mode: str) -> None:
    img = _image(60, 45).convert(mode)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = np.asarray(SeparableGaussianBlur(23, sigma=(0.1, 2.0))(img)).astype(int)
        torch.manual_seed(seed)
        ref = np.asarray(v2.GaussianBlur(23, sigma=(0.1, 2.0))(img)).astype(int)
        assert np.abs(ours - ref).max() <= 1


def test_blur_kernel_size() -> None:
    assert blur_kernel_size(224) == 23 and blur_kernel_size(28) == 3 and blur_kernel_size(16) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(8, 600))


def test_eval_transform() -> None:
    out = eval_transform(32, MEAN, STD)(_image(40, 70))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # At crop_ratio 1 a square image of size S passes through unchanged.
    img = _image(32, 32)
    assert torch.allclose(eval_transform(32, MEAN, STD, crop_ratio=1.0)(img), _normalized(img), atol=1e-6)


def test_finetune_resize_is_bicubic_as_glsim() -> None:
    """GLSim's reference: Resize((r, r), bicubic), then RandomCrop (train) or CenterCrop (test)."""
    img = _image(40, 50)
    plain = FinetuneAugmentConfig(resize_ratio=1.0, trivial_augment=False, random_erasing=0.0, flip=False)
    train, _ = finetune_transforms(16, plain, MEAN, STD)  # RandomCrop(16) of a 16x16 image: the whole image
    torch.testing.assert_close(train(img), _normalized(img.resize((16, 16), Image.BICUBIC)), rtol=0, atol=1e-6)
    _, test = finetune_transforms(16, FinetuneAugmentConfig(resize_ratio=1.25), MEAN, STD)  # 20x20, centre 16x16
    ref = _normalized(img.resize((20, 20), Image.BICUBIC).crop((2, 2, 18, 18)))
    torch.testing.assert_close(test(img), ref, rtol=0, atol=1e-6)


def test_finetune_random_erasing_area_reaches_the_reference_maximum() -> None:
    """GLSim's RandomErasing erases 2–40% of the image (torchvision's default stops at 33%)."""
    aug = FinetuneAugmentConfig(resize_ratio=1.0, trivial_augment=False, random_erasing=1.0, flip=False)
    train, _ = finetune_transforms(64, aug, MEAN, STD)
    img = _image(64, 64)
    torch.manual_seed(0)
    # Erased pixels are 0 in every channel; a normalised pixel cannot be (0.5 is no multiple of 1/255).
    fractions = [(train(img) == 0).all(0).float().mean().item() for _ in range(100)]
    # With a maximum of 33%, rounding the sides to whole pixels keeps the area below 34% at 64x64.
    assert 0.015 < min(fractions) and 0.345 < max(fractions) < 0.42


def test_cars_resize_to_s_over_0875_as_the_reference() -> None:
    """The reference resizes Stanford Cars to int(S / 0.875) (256 at 224), every other dataset to int(1.34·S)."""
    for name, side in (("cars", int(224 / 0.875)), ("cub", int(224 * 1.34)), ("aircraft", int(224 * 1.34))):
        cfg = load_config(f"configs/finetune/glsim_{name}.yaml", [], FinetuneConfig)
        assert cfg.data.image_size == 224
        train, test = finetune_transforms(224, cfg.augment, MEAN, STD)
        assert train.transforms[0].size == test.transforms[0].size == [side, side], name


def test_denormalize_inverts_normalize() -> None:
    x = torch.rand(2, 3, 5, 5)
    n = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(denormalize(n, MEAN, STD), x, atol=1e-6)
    assert denormalize(torch.full((3, 2, 2), 100.0), MEAN, STD).max() == 1.0


def test_transforms_pickle() -> None:
    """DataLoader workers receive the transform by pickling."""
    transform = pickle.loads(pickle.dumps(TwoViewTransform(16, AugmentConfig(), MEAN, STD)))
    assert transform(_image())[0].shape == (3, 16, 16)
