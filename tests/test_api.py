"""The README's Python API example, run as written on tiny data (its recipe and output folder pointed here)."""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from sslfg.config import save_config
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example(tiny_data: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    save_config(tiny_config(tiny_data, tmp_path / "unused"), recipe)
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import sslfg\n.*?)```", text, re.S).group(1)
    snippet = snippet.replace('"configs/pretrain/sample.yaml"', f'"{recipe}"')
    snippet = snippet.replace('"output_dir=runs/notebook"', f'"output_dir={tmp_path / "run"}"')
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - our README
    run = namespace["run"]
    assert run == tmp_path / "run" and (run / "backbone.safetensors").is_file()
    assert namespace["cfg"].train.epochs == 1
    assert namespace["knn"] == json.loads((run / "eval" / "knn.json").read_text())
    assert 0 <= namespace["knn"]["knn.k20.top1"] <= 1
    assert json.loads(json.dumps(namespace["probe"])) == json.loads((run / "eval" / "linear.json").read_text())
    features, images = namespace["features"], namespace["images"]
    assert features.shape == (8, 32) and [row["index"] for row in images] == [str(i) for i in range(8)]
    # the backbone and transform the API loads give the embedding's features
    model, transform = namespace["model"], namespace["transform"]
    first = Image.open(images[0]["path"]).convert("RGB")
    with torch.no_grad():
        cls = model.forward_features(transform(first)[None])[:, 0]
    assert torch.allclose(cls[0], torch.from_numpy(features[0]), atol=1e-5)
    # the notebook lives on, and holds none of the folders the functions wrote: a command may take them
    for folder in (run, run / "eval", run / "eval" / "embed-test"):
        with open(folder / ".sslfg-run.lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_overrides_go_with_a_recipe_path(tiny_data: Path, tmp_path: Path) -> None:
    import sslfg

    with pytest.raises(TypeError, match="recipe path"):
        sslfg.run_pretraining(tiny_config(tiny_data, tmp_path / "run"), "train.epochs=1")
