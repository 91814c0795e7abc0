"""Frozen features: pooling kinds, the cache key, and extraction order."""

from __future__ import annotations

from pathlib import Path

import torch

from sslfg.data.datasets import build_dataset
from sslfg.data.transforms import eval_transform
from sslfg.engine.accelerator import make_accelerator
from sslfg.evaluation.features import cached_features, extract_features, pool_features, weights_digest
from sslfg.models.backbone import forward_tokens
from sslfg.schema import DataConfig
from sslfg.weights import create_vit


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    return create_vit("vit_tiny_patch16_224", kwargs).eval()


def test_pool_kinds() -> None:
    vit, x = tiny_vit(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = forward_tokens(vit, x)
        torch.testing.assert_close(pool_features(vit, x, "cls"), tokens[:, 0])
        torch.testing.assert_close(pool_features(vit, x, "mean"), tokens[:, 1:].mean(1))
        last2 = pool_features(vit, x, "lastn", last_n=2)
        assert last2.shape == (2, 64)
        torch.testing.assert_close(last2[:, 32:], tokens[:, 0])  # the last block's CLS after the final norm


def tiny_split(root: Path, split: str = "train"):
    cfg = DataConfig(root=str(root), image_size=16)
    return build_dataset(cfg, split, eval_transform(16, cfg.mean, cfg.std, crop_ratio=1.0))


def test_extraction_keeps_dataset_order_with_ragged_batches(tiny_data: Path) -> None:
    vit, ds = tiny_vit(), tiny_split(tiny_data)  # 24 images, batch 5
    feats, labels = extract_features(vit, ds, make_accelerator(), batch_size=5, num_workers=0)
    assert feats.shape == (24, 32) and labels.tolist() == ds.labels
    with torch.no_grad():
        torch.testing.assert_close(feats[7], forward_tokens(vit, ds[7][0][None])[0, 0], rtol=1e-5, atol=1e-5)


def test_cache_is_reused_and_keyed_by_weights(tiny_data: Path, tmp_path: Path) -> None:
    ds, acc = tiny_split(tiny_data), make_accelerator()
    a = cached_features(tiny_vit(0), ds, "train", tmp_path, acc, batch_size=8, num_workers=0)
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 1
    again = cached_features(tiny_vit(0), ds, "train", tmp_path, acc, batch_size=8, num_workers=0)
    assert torch.equal(a[0], again[0])
    assert weights_digest(tiny_vit(0)) != weights_digest(tiny_vit(1))
    b = cached_features(tiny_vit(1), ds, "train", tmp_path, acc, batch_size=8, num_workers=0)
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 2 and not torch.equal(a[0], b[0])
    cached_features(tiny_vit(0), ds, "train", tmp_path, acc, batch_size=8, num_workers=0, kind="mean")
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 3  # the feature type is part of the key


def test_bf16_precision_is_close_to_fp32_and_part_of_the_cache_key(tiny_data: Path, tmp_path: Path) -> None:
    ds, acc = tiny_split(tiny_data), make_accelerator()
    fp32 = cached_features(tiny_vit(0), ds, "train", tmp_path, acc, batch_size=8, num_workers=0)
    bf16 = cached_features(tiny_vit(0), ds, "train", tmp_path, acc, batch_size=8, num_workers=0, precision="bf16")
    assert len(list(tmp_path.glob("train-*.safetensors"))) == 2  # bf16 did not reuse the fp32 features
    assert bf16[0].dtype == torch.float32 and torch.equal(bf16[1], fp32[1])
    assert not torch.equal(bf16[0], fp32[0])  # really computed in bf16 ...
    cos = torch.nn.functional.cosine_similarity(bf16[0], fp32[0], dim=1)
    assert cos.min() > 0.99  # ... and close to fp32 (bf16 keeps 8 bits of mantissa)
    again = cached_features(tiny_vit(0), ds, "train", tmp_path, acc, batch_size=8, num_workers=0, precision="bf16")
    assert torch.equal(again[0], bf16[0])  # read back from its own cache entry
