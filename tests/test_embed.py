"""eval.embed (issue 23 §2): .npy shards, images.csv and manifest.json that numpy and faiss read; the same files on
two gloo processes as on one; a stopped embedding resumes without recomputing its complete shards; a folder it
does not own is refused; the README's similarity search runs on its output."""

from __future__ import annotations

import csv
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

import sslfg.evaluation.embed
from sslfg.cli import run_cli
from sslfg.commands import embed
from sslfg.commands import pretrain as train_ssl
from sslfg.config import save_config
from sslfg.data.shards import write_shards
from sslfg.schema import DataConfig
from tests.conftest import tiny_config, write_csv_dataset
from tests.reliability.procs import command, finish, start

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--random-init", "--model", "vit_tiny_patch16_224",
         "model_kwargs={embed_dim: 32, depth: 2, num_heads: 2, patch_size: 4}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("embed_data"), n_train=24, n_test=11)


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return [*MODEL, f"data.root={data}", "data.image_size=16", "data.num_workers=0", "data.train_split=train",
            "features.batch_size=4", f"output_dir={out}", *extra]


def shards(out: Path) -> np.ndarray:
    return np.concatenate([np.load(f) for f in sorted(out.glob("shard-*.npy"))])


def test_shards_table_and_manifest(data: Path, tmp_path: Path) -> None:
    manifest = embed.main(args(data, tmp_path / "a", "--shard-size", "10"))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [".sslfg-run.lock", "images.csv", "manifest.json", "shard-00000.npy", "shard-00001.npy",
                     "shard-00002.npy"]
    x = shards(tmp_path / "a")
    assert x.shape == (24, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    assert [np.load(tmp_path / "a" / s["file"]).shape[0] for s in manifest["shards"]] == [10, 10, 4]
    stored = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest.pop("output_dir") == str(tmp_path / "a")  # returned beside the manifest, not stored in it
    assert stored == manifest and stored["complete"] and all(s["complete"] for s in stored["shards"])
    assert (stored["model"], stored["dim"], stored["count"], stored["dtype"]) == ("vit_tiny_patch16_224", 32, 24,
                                                                                "float32")
    assert "Normalize" in stored["transform"] and stored["labels"]
    rows = list(csv.DictReader((tmp_path / "a" / "images.csv").open()))
    assert [r["index"] for r in rows] == [str(i) for i in range(24)]
    assert [(Path(r["path"]).parent.name, r["label"]) for r in rows] == [(str(i % 3), str(i % 3)) for i in range(24)]
    one = embed.main(args(data, tmp_path / "b", "--dtype", "float16"))  # one shard, half precision
    assert len(one["shards"]) == 1 and np.load(tmp_path / "b" / "shard-00000.npy").dtype == np.float16
    np.testing.assert_allclose(shards(tmp_path / "b"), x, rtol=1e-2, atol=1e-2)


def test_unlabelled_folder_has_no_label_column(data: Path, tmp_path: Path) -> None:
    embed.main(args(data / "images" / "test", tmp_path / "out", "data.format=folder"))
    header, *rows = (tmp_path / "out" / "images.csv").read_text().splitlines()
    assert header == "index,path" and len(rows) == 11 and shards(tmp_path / "out").shape == (11, 32)


def test_sharded_images_are_named_by_shard_and_member(data: Path, tmp_path: Path) -> None:
    """The shards layout's images.csv held "<shard>.tar/<member>", a path that does not exist; now the shard file
    and the member in it, each column usable as it is (tar, webdataset), beside the same labels as the folder's."""
    write_shards(DataConfig(root=str(data), train_split="train", val_split="train"), str(tmp_path / "shards"))
    embed.main(args(tmp_path / "shards", tmp_path / "out", "data.format=shards"))
    embed.main(args(data, tmp_path / "files"))
    rows = list(csv.DictReader((tmp_path / "out" / "images.csv").open()))
    assert list(rows[0]) == ["index", "shard", "member", "label"] and len(rows) == 24
    sources = [r["path"] for r in csv.DictReader((tmp_path / "files" / "images.csv").open())]
    for row, source in zip(rows, sources, strict=True):
        with tarfile.open(row["shard"]) as tar:
            image = tar.extractfile(row["member"]).read()
            about = json.load(tar.extractfile(f"{row['member'].partition('.')[0]}.json"))
        assert image == Path(source).read_bytes() and about["label"] == int(row["label"])
    np.testing.assert_array_equal(shards(tmp_path / "out"), shards(tmp_path / "files"))


def test_a_split_that_is_not_there_is_named_by_the_key_that_chose_it(data: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--split tset` was reported as if a data.*_split key had chosen it; now the error names --split (or the key
    that did choose the split, eval_data's too) and the splits there are, for every layout."""
    write_shards(DataConfig(root=str(data), train_split="train", val_split="train"), str(tmp_path / "shards"))
    train = write_csv_dataset(tmp_path / "data", n_train=24, n_test=3)  # a pretraining recipe's own data
    for root, extra, expected in (
            (data, ["--split", "tset"], "--split (embed.split): 'tset' is not a split of {root} (no tset.csv there; "
             "its csv splits: test, train, train_val); set --split (embed.split) to one of them"),
            (tmp_path / "shards", ["--split", "tset", "data.format=shards"], "--split (embed.split): 'tset' is not a "
             "split of {root} (no tset.json there; its shards splits: test, train); set --split (embed.split) to"),
            (data, ["data.train_split=trian"], "data.train_split: 'trian' is not a split of {root} (no trian.csv"),
    ):
        assert run_cli(embed.main, [*args(root, tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {expected.format(root=root)}"), err
    cfg = tiny_config(train, tmp_path / "run", knn_every=1)
    cfg.eval_data.root, cfg.eval_data.train_split = str(data), "trian"
    save_config(cfg, tmp_path / "recipe.yaml")
    assert run_cli(train_ssl.main, ["--config", str(tmp_path / "recipe.yaml"), "--check"]) == 2
    assert f"error: eval_data.train_split: 'trian' is not a split of {data} (no trian.csv there; its csv splits: " \
           "test, train, train_val); set eval_data.train_split to one of them" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_stopped_embedding_recomputes_only_the_missing_shards(data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out, calls, stop_at = tmp_path / "out", [], [2]
    extract = sslfg.evaluation.embed.extract_features

    def counted(*a, **k):
        calls.append(len(a[1]))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt  # a stop while that shard is computed
        return extract(*a, **k)

    monkeypatch.setattr(sslfg.evaluation.embed, "extract_features", counted)
    assert run_cli(embed.main, args(data, out, "--shard-size", "10")) == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["complete"] for s in manifest["shards"]] == [True, False, False] and not manifest["complete"]
    first = (out / "shard-00000.npy").stat().st_mtime_ns
    stop_at[0], calls[:] = 0, []
    embed.main(args(data, out, "--shard-size", "10"))
    assert calls == [10, 4]  # shards 1 and 2 only
    assert (out / "shard-00000.npy").stat().st_mtime_ns == first
    (out / "shard-00002.npy").unlink()  # a lost shard is recomputed too
    stop_at[0], calls[:] = 1, []
    assert run_cli(embed.main, args(data, out, "--shard-size", "10")) == 130
    assert not json.loads((out / "manifest.json").read_text())["complete"]  # says so while it is missing
    stop_at[0], calls[:] = 0, []
    embed.main(args(data, out, "--shard-size", "10"))
    assert calls == [4]
    embed.main(args(data, tmp_path / "whole", "--shard-size", "10"))
    np.testing.assert_array_equal(shards(out), shards(tmp_path / "whole"))


def test_a_folder_it_does_not_own_is_refused(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    embed.main(args(data, tmp_path / "emb", "--shard-size", "10"))
    capsys.readouterr()
    for out, extra, why in ((tmp_path / "mine", [], "files that are not an embedding (notes.txt)"),
                            (tmp_path / "emb", ["--shard-size", "5"], "a finished embedding of other settings or "
                             "images (shard_size: 10 there, 5 now); eval.embed never writes over a finished"),
                            (tmp_path / "emb", ["data.train_split=test"], "(split: train there, test now; ")):
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        assert run_cli(embed.main, args(data, out, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: output_dir: {out} holds") and why in err[0], err
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_run_stopped_by_a_bad_image_is_rerun_into_its_folder(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A bad image (row 15: in the second shard of 10) stops the embedding; the same command with
    data.on_bad_image=skip was refused as "other data" and the folder was stuck. Now the rerun replaces the unfinished
    embedding, keeping its complete shard of unchanged images; what cannot be replaced without loss is refused
    naming what differs and what to do."""
    data, out = write_csv_dataset(tmp_path / "data", n_train=24, n_test=3), tmp_path / "out"
    bad = data / "images" / "train" / "0" / "0015.png"
    bad.write_bytes(b"not an image")
    assert run_cli(embed.main, args(data, out, "--shard-size", "10")) == 2
    assert str(bad) in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["complete"] for s in manifest["shards"]] == [True, False, False]
    first = (out / "shard-00000.npy").stat().st_mtime_ns

    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}  # other weights: shard 0 would be lost
    assert run_cli(embed.main, args(data, out, "--shard-size", "10", "data.on_bad_image=skip", "seed=1")) == 2
    err = capsys.readouterr().err.strip()
    assert f"error: output_dir: {out} holds an unfinished embedding of other settings or images (weights: random, " \
           "digest" in err and "its complete shards would be lost: finish it with its own settings or choose " \
           "another output_dir" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    assert run_cli(embed.main, args(data, out, "--shard-size", "10", "data.on_bad_image=skip")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 23
    assert (out / "shard-00000.npy").stat().st_mtime_ns == first  # rows 0-9: the same images, kept
    rows = list(csv.DictReader((out / "images.csv").open()))
    assert len(rows) == 23 and str(bad) not in {r["path"] for r in rows}
    embed.main(args(data, tmp_path / "fresh", "--shard-size", "10", "data.on_bad_image=skip"))
    np.testing.assert_array_equal(shards(out), shards(tmp_path / "fresh"))
    assert (out / "images.csv").read_text() == (tmp_path / "fresh" / "images.csv").read_text()

    shutil.copyfile(data / "images" / "train" / "0" / "0012.png", bad)  # fixed: 24 images, but the folder is finished
    capsys.readouterr()
    assert run_cli(embed.main, args(data, out, "--shard-size", "10")) == 2
    assert "holds a finished embedding of other settings or images (images: 23 there, 24 now" in \
        capsys.readouterr().err


def test_two_processes_write_what_one_process_writes(data: Path, tmp_path: Path) -> None:
    """11 test images, shards of 5, feature batch 4: no shard divides evenly over 2 processes x 4."""
    common = args(data, tmp_path)[:-1]  # without output_dir
    two = start(command(["-m", "eval.embed", *common, "--split", "test", "--shard-size", "5",
                         f"output_dir={tmp_path / '2'}"], processes=2))
    embed.main([*common, "--split", "test", "--shard-size", "5", f"output_dir={tmp_path / '1'}"])
    finish(two)
    one, two = tmp_path / "1", tmp_path / "2"
    assert (one / "images.csv").read_text() == (two / "images.csv").read_text()
    assert [np.load(p).shape for p in sorted(two.glob("shard-*.npy"))] == [(5, 32), (5, 32), (1, 32)]
    np.testing.assert_allclose(shards(one), shards(two), rtol=1e-5, atol=1e-5)
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    assert manifests[0] == manifests[1]


def test_readme_similarity_search_runs(data: Path, tmp_path: Path) -> None:
    """The README's numpy + faiss snippet, on an embedding made here (its `out = ...` line pointed at it)."""
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import glob.*?)```", text, re.S).group(1)
    assert len(snippet.splitlines()) <= 6
    embed.main(args(data, tmp_path / "emb", "--shard-size", "10"))
    namespace: dict = {}
    exec(re.sub(r'out = ".*"', f'out = "{tmp_path / "emb"}"', snippet), namespace)  # noqa: S102 - our README
    neighbours = namespace["neighbours"]
    assert neighbours.shape == (5, 4) and (neighbours[:, 0] == np.arange(5)).all()  # each image is its own nearest
    shutil.rmtree(tmp_path / "emb")
