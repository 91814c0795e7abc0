"""Pretrained weights by name (issue 16 item 1): `model.pretrained` / `--pretrained` load timm's weights for a
tagged timm name or an hf-hub: name from a Hugging Face cache this test writes in the layout huggingface_hub
reads (models--<org>--<name>/refs/main + snapshots/<revision>/), offline, through the real code paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from sslfg.commands import finetune as finetune_cli
from sslfg.commands import knn
from sslfg.commands import pretrain as train_ssl
from sslfg.config import ConfigError
from sslfg.weights import create_vit, pretrained_record
from tests.conftest import write_csv_dataset
from tests.reliability.procs import ENV, ROOT, pretrain_args

TAGGED = "vit_tiny_patch16_224.augreg_in21k"  # timm's hub id for it: timm/vit_tiny_patch16_224.augreg_in21k
HUB_REPO = "sslfg-test/tiny-vit"
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """Writes `files` as the main revision of hub model `repo` in the cache layout; returns the snapshot."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def tiny_weights(path: Path, seed: int, img_size: int = 32) -> dict[str, torch.Tensor]:
    """A tiny ViT's state dict with a 5-class head (which sslfg drops), saved as safetensors bytes at `path`."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=img_size, **TINY)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(path))
    return state


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict, dict]:
    """An offline Hugging Face cache holding the tagged name's repository and an hf-hub: repository."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    tagged = tiny_weights(tmp_path / "tagged.safetensors", seed=1)
    put_in_cache(cache, f"timm/{TAGGED}", {"model.safetensors": (tmp_path / "tagged.safetensors").read_bytes()})
    hub = tiny_weights(tmp_path / "hub.safetensors", seed=2)
    config = {"architecture": "vit_tiny_patch16_224", "model_args": {**TINY, "img_size": 32}, "num_classes": 5,
              "pretrained_cfg": {"input_size": [3, 32, 32], "classifier": "head", "mean": [0.5] * 3, "std": [0.5] * 3}}
    put_in_cache(cache, HUB_REPO, {"model.safetensors": (tmp_path / "hub.safetensors").read_bytes(),
                                   "config.json": json.dumps(config).encode()})
    return cache, tagged, hub


def assert_loaded(vit: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = vit.state_dict()
    assert own.keys() == {k for k in state if not k.startswith("head.")}
    for key, value in own.items():
        assert torch.equal(value, state[key]), key


def test_tagged_name_loads_its_hub_file_from_the_cache(hub_cache: tuple[Path, dict, dict]) -> None:
    cache, tagged, _ = hub_cache
    vit = create_vit(TAGGED, {"img_size": 32, **TINY}, pretrained=True)
    assert_loaded(vit, tagged)
    record = pretrained_record(vit)
    file = cache / f"models--timm--{TAGGED}" / "snapshots" / REVISION / "model.safetensors"
    assert record == {"init": f"pretrained {TAGGED}", "pretrained.name": TAGGED, "pretrained.tag": "augreg_in21k",
                      "pretrained.hub_id": f"timm/{TAGGED}", "pretrained.file": str(file)}
    # timm's own pretrained path reads the same cache entry to the same weights
    reference = timm.create_model(TAGGED, pretrained=True, num_classes=0, img_size=32, **TINY)
    assert_loaded(reference, tagged)


def test_hf_hub_name_takes_its_architecture_from_the_cached_config(hub_cache: tuple[Path, dict, dict]) -> None:
    _, _, hub = hub_cache
    vit = create_vit(f"hf-hub:{HUB_REPO}", {"img_size": 32}, pretrained=True)
    assert (vit.embed_dim, len(vit.blocks), vit.patch_embed.patch_size) == (32, 2, (8, 8))
    assert_loaded(vit, hub)
    assert pretrained_record(vit)["pretrained.hub_id"] == HUB_REPO
    assert_loaded(timm.create_model(f"hf-hub:{HUB_REPO}", pretrained=True, num_classes=0), hub)


def test_loading_stays_strict(hub_cache: tuple[Path, dict, dict]) -> None:
    """The cached file of depth 2 does not fill a depth-3 model: an error, not a partly random backbone."""
    with pytest.raises(ConfigError, match=r"model\.weights: .*model\.safetensors' does not fit .* 12 missing"):
        create_vit(TAGGED, {"img_size": 32, **TINY, "depth": 3}, pretrained=True)


def test_unknown_tag_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"model\.name: timm knows no tag 'nope' .*augreg_in21k_ft_in1k"):
        create_vit("vit_tiny_patch16_224.nope", {"img_size": 32, **TINY}, pretrained=True)


def test_each_command_records_what_it_loaded(hub_cache: tuple[Path, dict, dict], tmp_path: Path) -> None:
    """Pretraining (model.pretrained), kNN (--model NAME --pretrained) and fine-tuning (model.pretrained)
    build their backbone from the cached file and record it in their summaries."""
    _, tagged, _ = hub_cache
    data = write_csv_dataset(tmp_path / "data", size=32)
    geometry = {"data.image_size": 32, "model.name": TAGGED, "model.patch_size": 8,
                "model.kwargs": "{embed_dim: 32, depth: 2, num_heads: 2}", "model.pretrained": "true"}
    run = tmp_path / "pretrain"
    train_ssl.main([*pretrain_args(data, run, **geometry), "train.max_steps=1"])
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["init"], summary["pretrained.tag"]) == (f"pretrained {TAGGED}", "augreg_in21k")
    assert Path(summary["pretrained.file"]).read_bytes() == (tmp_path / "tagged.safetensors").read_bytes()

    knn_summary = knn.main(["--model", TAGGED, "--pretrained", "--check", f"data.root={data}", "data.image_size=32",
                            "data.train_split=train", "data.num_workers=0",
                            "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2, patch_size: 8}"])
    assert knn_summary["init"] == f"pretrained {TAGGED}"

    ft = tmp_path / "finetune"
    ft_args = [f"data.root={data}", "data.image_size=32", "data.train_split=train", "data.num_workers=0",
               "data.num_classes=3", f"model.name={TAGGED}", "model.patch_size=8", "model.pretrained=true",
               "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "model.top_k=3", "train.epochs=1",
               "train.max_steps=1", "train.batch_size=8", "train.warmup_steps=0", f"output_dir={ft}"]
    finetune_cli.main(ft_args)
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["init"] == f"pretrained {TAGGED}" and metrics["pretrained.hub_id"] == f"timm/{TAGGED}"


def test_offline_and_not_cached_is_one_error_line(tmp_path: Path) -> None:
    """A real run with an empty HF_HOME and HF_HUB_OFFLINE=1: exit 2 and one line saying how to get the file."""
    data = write_csv_dataset(tmp_path / "data", size=32)
    env = {**ENV, "HF_HOME": str(tmp_path / "empty_hf"), "HF_HUB_OFFLINE": "1"}
    args = pretrain_args(data, tmp_path / "run", **{"data.image_size": 32, "model.name": TAGGED,
                                                   "model.patch_size": 8, "model.pretrained": "true"})
    proc = subprocess.run([sys.executable, "train_ssl.py", *args, "--check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: model.name: no weights file of '{TAGGED}'"), proc.stderr
    for hint in (f"`hf download timm/{TAGGED}`", "HF_HUB_OFFLINE is set", str(tmp_path / "empty_hf" / "hub"),
                 "model.weights=PATH"):
        assert hint in lines[0], (hint, lines[0])
