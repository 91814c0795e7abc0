"""The batched two-view augmentation (data.augment_on: device): each batched operation against torchvision's
per-image functional op with the same parameters, the parameter draws against the configured probabilities,
the batch path against the PIL worker path under the same seed, and exact resume of a run that uses it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from sslfg.config import ConfigError, load_config
from sslfg.data import batch_augment as ba
from sslfg.data.transforms import TwoViewTransform, blur_kernel_size
from sslfg.pretrain import pretrain
from sslfg.schema import AugmentConfig, PretrainConfig
from tests.conftest import tiny_config
from tests.reliability.procs import assert_same_run

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
B = 6


def _images(size: int = 16, seed: int = 0) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1]: noise, a smooth gradient, pure greys (hue undefined) and saturated pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, size, size, generator=g)
    x[1] = torch.linspace(0, 1, size).view(1, 1, size) * torch.tensor([1.0, 0.5, 0.2]).view(3, 1, 1)
    x[2] = x[2, :1]  # grey
    x[3] = (x[3] > 0.5).float()  # 0 / 1 only
    return x


def _params(**columns: torch.Tensor | float) -> torch.Tensor:
    """(B, NUM_PARAMS): jitter on, neutral factors, identity order, no grey / blur / solarize, then `columns`."""
    p = torch.zeros(B, ba.NUM_PARAMS)
    p[:, [ba.JITTER, ba.BRIGHTNESS, ba.CONTRAST, ba.SATURATION]] = 1.0
    p[:, ba.ORDER] = torch.arange(4.0)
    for name, value in columns.items():
        p[:, getattr(ba, name.upper())] = value
    return p


def _each(fn, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(x[i], float(values[i])) for i in range(len(x))])


FACTORS = torch.tensor([0.6, 0.85, 1.0, 1.2, 1.4, 0.0])


@pytest.mark.parametrize(("column", "reference"), [("brightness", TF.adjust_brightness),
                                                   ("contrast", TF.adjust_contrast),
                                                   ("saturation", TF.adjust_saturation)])
def test_blend_ops_equal_torchvision(column: str, reference) -> None:
    x = _images()
    out = ba.colour_jitter(x, _params(**{column: FACTORS}), hue=False)
    torch.testing.assert_close(out, _each(reference, x, FACTORS), rtol=0, atol=1e-6)  # float32 rounding


def test_hue_equals_torchvision() -> None:
    x, hue = _images(), torch.tensor([-0.5, -0.1, 0.0, 0.03, 0.25, 0.5])
    torch.testing.assert_close(ba.adjust_hue(x, hue), _each(TF.adjust_hue, x, hue), rtol=0, atol=1e-5)
    p = _params(hue=hue)
    p[:, ba.ORDER] = torch.tensor([3.0, 0, 1, 2])
    torch.testing.assert_close(ba.colour_jitter(x, p), _each(TF.adjust_hue, x, hue), rtol=0, atol=1e-5)


def test_colour_jitter_in_each_images_own_order_equals_torchvision() -> None:
    """Per-image random order and factors, jitter off for one image, against v2.ColorJitter's own transform."""
    x, jitter = _images(seed=1), v2.ColorJitter(0.4, 0.4, 0.4, 0.1)
    torch.manual_seed(0)
    drawn = [jitter.make_params([]) for _ in range(B)]
    p = _params()
    for i, d in enumerate(drawn):
        p[i, ba.ORDER] = d["fn_idx"].float()
        p[i, [ba.BRIGHTNESS, ba.CONTRAST, ba.SATURATION, ba.HUE]] = torch.tensor(
            [d["brightness_factor"], d["contrast_factor"], d["saturation_factor"], d["hue_factor"]])
    p[4, ba.JITTER] = 0.0
    ref = torch.stack([x[i] if i == 4 else jitter.transform(x[i], drawn[i]) for i in range(B)])
    assert len({tuple(d["fn_idx"].tolist()) for d in drawn}) > 1  # the orders differ
    torch.testing.assert_close(ba.colour_jitter(x, p), ref, rtol=0, atol=1e-5)
    assert torch.equal(ba.colour_jitter(x, p)[4], x[4])


@pytest.mark.parametrize("size", [16, 48])  # kernel 3 and 5
def test_blur_with_a_sigma_per_image_equals_torchvision(size: int) -> None:
    x, sigma = _images(size), torch.tensor([0.1, 0.5, 1.0, 2.0, 0.0, 1.3])
    k = blur_kernel_size(size)
    ref = torch.stack([x[i] if s == 0 else TF.gaussian_blur(x[i], [k, k], [float(s), float(s)])
                       for i, s in enumerate(sigma)])
    out = ba.gaussian_blur(x, sigma)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(out[4], x[4])  # sigma 0: untouched


def test_grayscale_solarize_and_normalize_equal_torchvision() -> None:
    u8 = (_images() * 255).round().to(torch.uint8)
    x = u8.float() / 255
    flags = torch.tensor([1.0, 0, 1, 0, 1, 0])
    out = ba.photometric(u8, _params(jitter=0.0, grayscale=flags, solarize=1 - flags), MEAN, STD)
    ref = torch.stack([TF.rgb_to_grayscale(x[i], 3) if f else TF.solarize(x[i], 128 / 255)
                       for i, f in enumerate(flags)])
    torch.testing.assert_close(out, TF.normalize(ref, MEAN, STD), rtol=0, atol=1e-6)


def test_parameter_draws_follow_the_configured_probabilities() -> None:
    aug = AugmentConfig(jitter=(0.4, 0.3, 0.2, 0.1), jitter_p=0.7, grayscale_p=0.3, blur_p=(0.6, 0.1),
                        blur_sigma=(0.2, 1.5), solarize_p=(0.05, 0.4))
    crops, img, n = ba.TwoViewCrops(8, aug), Image.new("RGB", (10, 12)), 3000
    params = []
    for i in range(n):
        torch.manual_seed(i)
        params.append(crops(img)[2])
    p = torch.stack(params)  # (n, 2, NUM_PARAMS)

    def rate(column: int, view: int, where: torch.Tensor | None = None) -> tuple[float, int]:
        values = p[:, view, column] if where is None else p[where[:, view], view, column]
        return float((values > 0).float().mean()), len(values)

    expected = {(ba.JITTER, 0): 0.7, (ba.JITTER, 1): 0.7, (ba.GRAYSCALE, 0): 0.3, (ba.GRAYSCALE, 1): 0.3,
                (ba.SIGMA, 0): 0.6, (ba.SIGMA, 1): 0.1, (ba.SOLARIZE, 0): 0.05, (ba.SOLARIZE, 1): 0.4}
    for (column, view), prob in expected.items():
        observed, m = rate(column, view)
        assert abs(observed - prob) < 4.5 * math.sqrt(prob * (1 - prob) / m), (column, view, observed, prob)
    on = p[:, :, ba.JITTER] > 0
    for view in (0, 1):
        q = p[on[:, view], view]
        for column, (lo, hi) in ((ba.BRIGHTNESS, (0.6, 1.4)), (ba.CONTRAST, (0.7, 1.3)),
                                 (ba.SATURATION, (0.8, 1.2)), (ba.HUE, (-0.1, 0.1))):
            v = q[:, column]  # uniform on [lo, hi]: mean and spread
            assert lo <= v.min() and v.max() <= hi
            tol = 4.5 * (hi - lo) / math.sqrt(12 * len(v))
            assert abs(v.mean() - (lo + hi) / 2) < tol and abs(v.std() - (hi - lo) / math.sqrt(12)) < 2 * tol
        assert torch.equal(q[:, ba.ORDER].sort(1).values, torch.arange(4.0).expand(len(q), 4))  # permutations
        assert len({tuple(o) for o in q[:, ba.ORDER].tolist()}) == 24
        sigma = p[:, view, ba.SIGMA][p[:, view, ba.SIGMA] > 0]
        assert 0.2 <= sigma.min() and sigma.max() <= 1.5
    off = p[~on[:, 0], 0][:, [ba.BRIGHTNESS, ba.CONTRAST, ba.SATURATION, ba.HUE]]
    assert len(off) and (off == torch.tensor([1, 1, 1, 0.0])).all()  # jitter off: neutral factors


@pytest.mark.parametrize("local", [{}, {"local_crops": 2, "local_crop_size": 12, "interpolation": "bicubic"}])
def test_batch_path_gives_the_worker_paths_views_under_the_same_seed(local: dict) -> None:
    """Same seed: same crops and parameters, so the same views, up to the PIL path's 8-bit rounding after
    every operation (its hue is computed in 8-bit HSV): mean |difference| ≤ 2.5 and max ≤ 16 grey levels.
    Views that draw no photometric change are bitwise equal. Also with DINO's local views (multi-crop) and
    bicubic crops."""
    aug, size = AugmentConfig(blur_sigma=(0.1, 1.0), **local), 24
    workers, crops = TwoViewTransform(size, aug, MEAN, STD), ba.TwoViewCrops(size, aug)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).resize((40, 48)) for _ in range(12)]
    ref, items = [], []
    for seed, img in enumerate(images):
        torch.manual_seed(seed)
        ref.append(workers(img))
        torch.manual_seed(seed)
        items.append(crops(img))
    *uint8, params = (torch.stack(parts) for parts in zip(*items, strict=True))
    pipeline = ba.TwoViewPipeline(crops, "device", MEAN, STD, hue=True)
    levels, plain_views = torch.tensor(STD).view(1, 3, 1, 1) * 255, 0
    batches = pipeline.to_device([*uint8, params], torch.device("cpu"))
    assert [b.shape[-1] for b in batches] == [24, 24] + [12] * local.get("local_crops", 0)
    for view, batch in enumerate(batches):
        diff = ((batch - torch.stack([r[view] for r in ref])) * levels).abs()
        assert diff.mean((1, 2, 3)).max() <= 2.5 and diff.max() <= 16, (view, diff.mean((1, 2, 3)), diff.max())
        plain = (params[:, view, [ba.JITTER, ba.GRAYSCALE, ba.SIGMA, ba.SOLARIZE]] == 0).all(1)
        assert (diff[plain] == 0).all()
        plain_views += int(plain.sum())
    assert plain_views > 0  # view 1 is always blurred: these come from view 2
    other = ((batches[1] - torch.stack([r[0] for r in ref])) * levels).abs().mean()  # view 2 against view 1
    assert other > 20  # the tolerance separates a different view


def test_each_image_is_augmented_alone() -> None:
    """A batch augmented whole equals its halves augmented apart, bitwise (what two processes each do)."""
    u8 = (_images(16, seed=3) * 255).to(torch.uint8)
    torch.manual_seed(0)
    p = torch.stack([ba.draw_view_params(AugmentConfig(), v2.ColorJitter(0.4, 0.4, 0.2, 0.1), 0.5, 0.5)
                     for _ in range(B)])
    whole = ba.photometric(u8, p, MEAN, STD)
    assert torch.equal(whole, torch.cat([ba.photometric(u8[:3], p[:3], MEAN, STD),
                                         ba.photometric(u8[3:], p[3:], MEAN, STD)]))


def test_augment_on_setting() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ba.resolve_augment_on("workers", cuda, 28) == "workers"
    assert ba.resolve_augment_on("device", cpu, 224) == "device"
    # auto: the measured faster path (bench/input_pipeline.py)
    assert [ba.resolve_augment_on("auto", cpu, s) for s in (28, 64, 112, 224)] == ["device"] * 2 + ["workers"] * 2
    assert ba.resolve_augment_on("auto", cuda, 224) == "device"
    with pytest.raises(ConfigError, match="data.augment_on"):
        load_config(None, ["data.augment_on=gpu"], PretrainConfig)


def test_device_augmented_run_resumes_exactly(tiny_data: Path, tmp_path: Path) -> None:
    """data.augment_on: device, stopped mid-epoch with loader workers and resumed: bitwise the straight run."""
    straight_cfg = tiny_config(tiny_data, tmp_path / "straight")
    straight_cfg.data.augment_on = "device"
    straight = pretrain(straight_cfg)
    cfg = tiny_config(tiny_data, tmp_path / "resumed", max_steps=2)
    cfg.data.augment_on, cfg.data.num_workers = "device", 2
    resumed = pretrain(cfg)
    cfg.resume, cfg.train.max_steps = "auto", 0
    pretrain(cfg)
    assert_same_run(straight, resumed, "device augmentation")
