"""Two gloo processes with batch B train exactly like one process with batch 2B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sslfg.engine.checkpoint import checkpoint_dirs

ROOT = Path(__file__).resolve().parents[1]


def overrides(data: Path, out: Path, batch: int) -> list[str]:
    return [
        f"data.root={data}", "data.image_size=16", "data.num_workers=0", "data.train_split=train",
        "model.name=vit_tiny_patch16_224", "model.patch_size=4", "model.kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
        "model.proj_hidden_dim=64", "model.pred_hidden_dim=64", "model.predictor_dropout=0.0",
        "train.epochs=2", "train.checkpoint_every=100", "train.figure_samples=0", "train.log_every=1",
        f"train.batch_size={batch}", f"output_dir={out}",
    ]


def launch(args: list[str], processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "train_ssl.py", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train_ssl.py", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_equal_one_process_with_double_batch(tiny_data: Path, tmp_path: Path) -> None:
    launch(overrides(tiny_data, tmp_path / "one", 8), processes=1)
    launch(overrides(tiny_data, tmp_path / "two", 4), processes=2)
    runs = [tmp_path / "one", tmp_path / "two"]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert [s["num_processes"] for s in summaries] == [1, 2]
    assert summaries[0]["global_batch"] == summaries[1]["global_batch"]
    metrics = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
    assert len(metrics[0]) == len(metrics[1]) == 6
    for a, b in zip(*metrics, strict=True):
        assert a["lr"] == b["lr"] and a["momentum"] == b["momentum"]
        for key in ("loss", "loss_global", "loss_local"):
            assert abs(a[key] - b[key]) < 1e-4 * abs(a[key]), (key, a, b)
    weights = [load_file(str(checkpoint_dirs(r)[-1] / "model.safetensors")) for r in runs]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-4, msg=key)
