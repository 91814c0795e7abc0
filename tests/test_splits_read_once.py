"""Each command reads (and with data.on_bad_image=skip decodes) each split once: the online evaluations share
their splits with each other and the pretraining, and every eval command builds each split it reads once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from sslfg.commands import embed, knn, linear, localise
from sslfg.data.datasets import _ImageListDataset
from sslfg.pretrain import pretrain
from tests.conftest import tiny_config, write_csv_dataset

TINY = ("--random-init", "--model", "vit_tiny_patch16_224",
        "model_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}")


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """The listings (csv files) whose every image was decoded, how many times each."""
    scans: Counter = Counter()
    scan = _ImageListDataset._apply_policy

    def counted(self: _ImageListDataset, on_bad_image: str) -> None:
        scans[Path(self.source).name] += on_bad_image == "skip"
        scan(self, on_bad_image)

    monkeypatch.setattr(_ImageListDataset, "_apply_policy", counted)
    return scans


@pytest.fixture(scope="module")
def boxed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("boxed"), boxes=True)


def test_pretraining_with_both_online_evaluations_reads_each_split_once(boxed: Path, tmp_path: Path,
                                                                        decoded: Counter) -> None:
    cfg = tiny_config(boxed, tmp_path / "run", knn_every=1, loc_every=1, knn_samples=20, figure_samples=0)
    cfg.data.boxes, cfg.data.on_bad_image = True, "skip"
    summaries: list[dict] = []
    pretrain(cfg, check=True, on_summary=summaries.append)
    assert summaries[0]["online_knn"].startswith("every 1 epochs") and summaries[0]["online_loc"].startswith("every")
    assert decoded == {"train.csv": 1, "test.csv": 1}  # was 2 and 2: the pretraining, the kNN bank, both queries


@pytest.mark.parametrize("command", [knn, linear, localise, embed], ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_eval_commands_read_each_split_once(command, boxed: Path, tmp_path: Path, decoded: Counter) -> None:
    args = [*TINY, f"data.root={boxed}", "data.image_size=16", "data.num_workers=0", "data.train_split=train",
            "data.test_split=test", "data.boxes=true", "data.on_bad_image=skip", f"output_dir={tmp_path / 'out'}",
            "features.batch_size=16", "knn.ks=[5]", "linear.epochs=1", "linear.lrs=[0.1]", "localise.figure_samples=0"]
    command.main(args)
    assert decoded == ({"train.csv": 1} if command is embed else {"train.csv": 1, "test.csv": 1})
