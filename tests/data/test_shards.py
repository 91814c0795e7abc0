"""The shards layout (issue 25): `python -m sslfg.data.shards` writes it, `data.format: shards` reads it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sslfg.commands import knn
from sslfg.commands import pretrain as train_ssl
from sslfg.config import ConfigError, load_config
from sslfg.data import shards
from sslfg.data.datasets import build_dataset
from sslfg.data.images import DataError
from sslfg.data.shard_reader import ShardDataset
from sslfg.evaluation.features import cache_key
from sslfg.evaluation.online import evaluation_data
from sslfg.evaluation.selection import selection_splits
from sslfg.pretrain import pretrain
from sslfg.schema import DataConfig, PretrainConfig
from tests.conftest import tiny_config, write_csv_dataset
from tests.reliability.outcomes import user_error
from tests.reliability.procs import assert_same_optimizer, command, final_state, finish, pretrain_args, start

SMALL_MB = 0.002  # 2 KiB shards: about one tiny image each, so every split spans several shards


@pytest.fixture(scope="module")
def boxed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(tmp_path_factory.mktemp("boxed"), boxes=True)


@pytest.fixture(scope="module")
def sharded(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny csv dataset (splits train and test) as shards."""
    out = tmp_path_factory.mktemp("sharded") / "shards"
    shards.write_shards(DataConfig(root=str(tiny_data), train_split="train"), str(out), SMALL_MB)
    return out


def imagefolder(csv_root: Path, out: Path) -> Path:
    """The images of a csv dataset as root/<split>/<class>/<image> (they are stored as images/<split>/<class>/)."""
    shutil.copytree(csv_root / "images", out)
    return out


def assert_same_split(original, sharded: ShardDataset) -> None:
    """Every image (decoded), label, class name, size and box of `sharded` equals the original's, in order."""
    assert len(sharded) == len(original) and sharded.classes == original.classes
    assert sharded.num_classes == original.num_classes
    for i in range(len(original)):
        (a, label_a), (b, label_b) = original[i], sharded[i]
        assert label_a == label_b and type(label_b) is int
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b)), i
        assert tuple(sharded.sizes[i]) == a.size
    if original.boxes is not None:
        assert np.array_equal(np.asarray(original.boxes, np.float64), sharded.boxes)


@pytest.mark.parametrize("layout", ["csv+boxes", "csv unlabelled", "imagefolder", "folder"])
def test_writer_round_trip(layout: str, boxed: Path, tmp_path: Path) -> None:
    """Every supported layout: each split becomes several shards whose every image, label and box reads back
    equal; the members follow WebDataset naming (<key>.png, <key>.cls, <key>.json)."""
    data = {"csv+boxes": DataConfig(root=str(boxed), train_split="train", boxes=True),
            "csv unlabelled": DataConfig(root=str(boxed), train_split="train", labels=False),
            "imagefolder": DataConfig(root=str(imagefolder(boxed, tmp_path / "if")), format="imagefolder",
                                      train_split="train"),
            "folder": DataConfig(root=str(boxed / "images"), format="folder", train_split="all")}[layout]
    out = tmp_path / "shards"
    splits = shards.main(["--config", os.devnull, "--out", str(out), "--shard-mb", str(SMALL_MB),
                          *(f"data.{k}={v}" for k, v in vars(data).items() if k in ("root", "format", "train_split",
                                                                                     "boxes", "labels"))])
    assert splits == (["all"] if layout == "folder" else ["train", "test"])
    read = DataConfig(root=str(out), format="shards", train_split=data.train_split, boxes=data.boxes,
                      labels=data.labels and layout != "folder")
    for split in splits:
        sharded = build_dataset(read, split)
        assert isinstance(sharded, ShardDataset) and (sharded.boxes is not None) == data.boxes
        assert_same_split(build_dataset(data, split), sharded)
        meta = json.loads((out / f"{split}.json").read_text())
        assert len(meta["shardlist"]) > 1 and sum(s["nsamples"] for s in meta["shardlist"]) == len(sharded)
        with tarfile.open(out / meta["shardlist"][0]["url"]) as tar:
            names = tar.getnames()
            about = json.loads(tar.extractfile(names[-1]).read())
            image = tar.getmember(names[0])
        assert (image.offset_data, image.size) == (sharded._offset[0], sharded._nbytes[0])  # the index = tar's view
        labelled = layout in ("csv+boxes", "imagefolder")
        assert names == ["000000000.png", *(["000000000.cls"] if labelled else []), "000000000.json"]
        assert about["label"] == (sharded.labels[0] if labelled else None)
        assert ("box" in about) == data.boxes and about["size"] == list(sharded.sizes[0])


def test_every_split_the_commands_read_is_written(tiny_data: Path, tmp_path: Path) -> None:
    """data.train_split, val_split, test_split and `train`, which the selections pair with val_split: the linear
    probe and the study's fine-tuning init choose on the same splits from the shards as from the csv files."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    shutil.copy(root / "test.csv", root / "val.csv")
    data = DataConfig(root=str(root), train_split="train_val", val_split="val", test_split="test")
    assert shards.write_shards(data, str(tmp_path / "s")) == ["train_val", "val", "test", "train"]
    read = dataclasses.replace(data, root=str(tmp_path / "s"), format="shards")
    assert selection_splits(read) == selection_splits(data) == ("train", "val")


def test_writer_never_overwrites(sharded: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(os.listdir(sharded))
    message = user_error(shards.main, ["--config", os.devnull, "--out", str(sharded), f"data.root={tiny_data}"],
                         capsys)
    assert str(sharded) in message and "never overwrites" in message
    assert sorted(os.listdir(sharded)) == before


@pytest.mark.parametrize("inside", ["shards", "images/shards", "."])
def test_writer_refuses_an_out_inside_the_data_it_reads(inside: str, tiny_data: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: `--out <data.root>/shards` wrote the shards into the dataset it read, which every other command
    refuses for its output folder; now the same error, naming --out, the folder and a folder beside it."""
    root = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    out = root / inside
    message = user_error(shards.main, ["--config", os.devnull, "--out", str(out), f"data.root={root}",
                                       "data.train_split=train"], capsys)
    assert message == (f"--out: '{out}' is inside the dataset folder '{root}' that this command reads; its files "
                       "would mix with the data (a folder layout would read its figures as images next time): name a "
                       f"folder outside it, e.g. --out {root}_shards"), message
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # no shard, no temporary folder


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_writer_checks_every_image(policy: str, tiny_data: Path, tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """A truncated image: with error the writer stops naming the file and its csv row and leaves no folder, no
    partial one; with skip it is logged and left out, the rest written."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    bad = root / "images" / "train" / "1" / "0004.png"
    bad.write_bytes(bad.read_bytes()[:60])
    data = DataConfig(root=str(root), train_split="train", on_bad_image=policy)
    out = tmp_path / "out" / "shards"
    if policy == "error":
        with pytest.raises(DataError, match=rf"{bad}.*train.csv, data row 5"):
            shards.write_shards(data, str(out))
        assert os.listdir(out.parent) == []
        return
    with caplog.at_level(logging.WARNING):
        shards.write_shards(data, str(out))
    assert str(bad) in caplog.text
    meta = json.loads((out / "train.json").read_text())
    assert meta["samples"] == 23 and meta["skipped"] == 1
    assert len(ShardDataset(str(out), "train")) == 23


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_shard_is_one_error_naming_it(damage: str, sharded: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated or missing shard stops a command at start-up with one `error:` line naming it and the writer
    command that makes it again."""
    copy = tmp_path / "shards"
    shutil.copytree(sharded, copy)
    shard = copy / "train-000003.tar"
    if damage == "missing":
        shard.unlink()
    else:
        os.truncate(shard, shard.stat().st_size // 2)
    args = [*pretrain_args(copy, tmp_path / "run"), "data.format=shards", "--check"]
    message = user_error(train_ssl.main, args, capsys)
    assert str(shard) in message and damage in message and "python -m sslfg.data.shards" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_shard_is_skipped_and_logged_under_skip(damage: str, sharded: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(sharded, copy)
    meta = json.loads((copy / "train.json").read_text())
    shard = copy / meta["shardlist"][3]["url"]
    lost = meta["shardlist"][3]["nsamples"]
    if damage == "missing":
        shard.unlink()
    else:
        os.truncate(shard, 700)  # inside the first image: every sample of the shard is lost
    with caplog.at_level(logging.WARNING):
        dataset = ShardDataset(str(copy), "train", on_bad_image="skip")
    assert len(dataset) == meta["samples"] - lost and len(dataset.skipped) == lost
    assert all(str(shard) in path and str(shard) in reason for path, reason in dataset.skipped)
    assert f"{shard} " in caplog.text
    intact = ShardDataset(str(sharded), "train")
    kept = [i for i in range(len(intact)) if intact._shard[i] != 3]
    assert [dataset.labels[j] for j in range(len(dataset))] == [intact.labels[i] for i in kept]
    assert np.array_equal(np.asarray(dataset[3][0]), np.asarray(intact[kept[3]][0]))


def test_reader_refuses_what_the_shards_lack(boxed: Path, sharded: Path, tmp_path: Path) -> None:
    """Labels from shards written without labels, boxes from shards without boxes, a split not written, another
    class count: each a DataError naming the file and the setting that fixes it."""
    out = tmp_path / "shards"
    shards.write_shards(DataConfig(root=str(boxed / "images"), format="folder", train_split="all"), str(out))
    read = DataConfig(root=str(out), format="shards", train_split="all")
    with pytest.raises(DataError, match=r"all\.json.*without labels; to pretrain on .* set data.labels=false "
                                        r"\(evaluations need labels\)"):
        build_dataset(read, "all")
    with pytest.raises(DataError, match=r"data.boxes is true but .*all\.npz has no object boxes"):
        build_dataset(DataConfig(root=str(out), format="shards", labels=False, boxes=True), "all")
    with pytest.raises(DataError, match=r"data.test_split: 'test' is not a split of .* \(no test\.json there; its "
                                        r"shards splits: all\); set data.test_split to one of them"):
        build_dataset(read, "test")
    with pytest.raises(DataError, match=r"train\.json has 3 classes but data.num_classes is 5"):
        build_dataset(DataConfig(root=str(sharded), format="shards", train_split="train", num_classes=5), "train")
    with pytest.raises(ConfigError, match="already shards"):
        shards.write_shards(read, str(tmp_path / "again"))
    # shards read as another layout: the error says what the folder holds
    with pytest.raises(DataError, match=r"no all\.csv there.*holds tar shards of this split .*set data.format=shards"):
        build_dataset(DataConfig(root=str(out), format="csv", train_split="all"), "all")


# webdataset 1.0.2, webdataset/tariterators.py (verbatim): how webdataset groups a tar's members into samples
def base_plus_ext(path):
    """Split off all file extensions.

    Args:
        path: Path with extensions.

    Returns:
        Tuple containing the base path and all extensions.
    """
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", path)
    if not match:
        return None, None
    return match.group(1), match.group(2)


# wids 0.1.11, wids/wids_specs.py (verbatim): what wids requires of a dataset description's shard list
def check_shards(l):  # noqa: E741 (verbatim)
    """Check that a list of shards is well-formed.

    This checks that the list is a list of dictionaries, and that
    each dictionary has a "url" and a "nsamples" key.
    """
    assert isinstance(l, list)
    for shard in l:
        assert isinstance(shard, dict)
        assert "url" in shard
        assert "nsamples" in shard
    return l


def test_shards_follow_webdataset_and_wids(sharded: Path) -> None:
    """The split's json is a wids dataset description (wids_version 1, a shard list whose relative urls name the
    tar files with their sample counts), and webdataset's grouping of each tar's members by key gives one sample
    per indexed image, in index order, with the image, its .cls and its .json (webdataset and wids themselves
    read the sample's shards equal to sslfg: bench/webdataset_compat.py)."""
    meta = json.loads((sharded / "train.json").read_text())
    assert meta["wids_version"] == 1 and meta["name"] == "train"  # wids_specs.resolve_dsdesc's assertions
    check_shards(meta["shardlist"])
    dataset = ShardDataset(str(sharded), "train")
    keys, start = [], 0
    for shard in meta["shardlist"]:
        assert not os.path.isabs(shard["url"]) and shard["filesize"] == os.path.getsize(sharded / shard["url"])
        with tarfile.open(sharded / shard["url"]) as tar:
            samples: dict[str, set[str]] = {}
            for name in tar.getnames():
                key, ext = base_plus_ext(name)
                samples.setdefault(key, set()).add(ext)
        assert len(samples) == shard["nsamples"]
        keys += list(samples)
        assert all(exts == {"png", "cls", "json"} for exts in samples.values())
        start += shard["nsamples"]
    assert start == len(dataset) and keys == [dataset.member(i)[1].split(".")[0] for i in range(len(dataset))]


def test_shards_of_an_older_format_are_one_error_asking_to_rewrite(sharded: Path, tmp_path: Path) -> None:
    copy = tmp_path / "old"
    shutil.copytree(sharded, copy)
    meta = json.loads((copy / "train.json").read_text())
    (copy / "train.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(DataError, match=r"train\.json is not a shard index of format 2. Write the shards of .* again"):
        ShardDataset(str(copy), "train")


def test_index_memory_per_sample(boxed: Path, tmp_path: Path) -> None:
    """The reader keeps numpy arrays only (no Python object per sample): 33 bytes a sample, 65 with boxes, so a
    10 M-image index stays well under 1 GB (bench/shards.py measures a 10 M index itself)."""
    shards.write_shards(DataConfig(root=str(boxed), train_split="train", boxes=True), str(tmp_path / "s"))
    dataset = ShardDataset(str(tmp_path / "s"), "train", boxes=True)
    arrays = [v for v in vars(dataset).values() if isinstance(v, np.ndarray)]
    assert all(len(a) == len(dataset) for a in arrays)
    assert not [k for k, v in vars(dataset).items() if isinstance(v, list | tuple) and len(v) >= len(dataset)]
    assert sum(a.nbytes for a in arrays) / len(dataset) == 33 + 32  # the boxes are 32 of it
    assert dataset.paths[5].endswith("train-000000.tar/000000005.png") and len(dataset.paths) == len(dataset)


def test_two_gloo_processes_see_disjoint_samples_that_cover_the_epoch(sharded: Path, tiny_data: Path,
                                                                      tmp_path: Path) -> None:
    """Two processes reading the shards through the training loader (batch 4 each, a loader worker each): in
    each epoch they get disjoint images, together every one of the 24 exactly once."""
    finish(start(command(["tests/data/shard_epoch.py", str(sharded), str(tmp_path)], processes=2)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    from tests.data.shard_epoch import digest

    every = sorted(digest(img) for img, _ in build_dataset(DataConfig(root=str(tiny_data), train_split="train"),
                                                           "train"))
    for epoch in ("0", "1"):
        a, b = (r["seen"][epoch] for r in ranks)
        assert len(a) == len(b) == 12 and not set(a) & set(b) and sorted(a + b) == every
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # reshuffled each epoch


@pytest.fixture(scope="module")
def straight_runs(tiny_data: Path, sharded: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same uninterrupted pretraining on the csv layout and on its shards."""
    root = tmp_path_factory.mktemp("straight")
    folder_cfg, cfg = tiny_config(tiny_data, root / "folder", figure_samples=0), tiny_config(sharded, root / "shards")
    folder_cfg.data.augment_on = cfg.data.augment_on = "device"  # the batch augmentation on the training device
    cfg.data.format, cfg.train.figure_samples = "shards", 0
    return pretrain(folder_cfg), pretrain(cfg)


def test_pretraining_and_knn_on_a_sharded_copy_give_the_same_numbers(straight_runs: tuple[Path, Path],
                                                                      tiny_data: Path, sharded: Path) -> None:
    """What a study runs (pretraining, then eval.knn) gives bitwise the same weights and metrics from the shards
    as from the original layout."""
    folder, sharded_run = straight_runs
    (model_a, optim_a, metrics_a), (model_b, optim_b, metrics_b) = final_state(folder), final_state(sharded_run)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a) and model_a.keys() == model_b.keys()
    assert_same_optimizer(optim_a, optim_b)
    assert metrics_a == metrics_b
    common = ["data.image_size=16", "data.num_workers=0", "data.train_split=train", "features.batch_size=5",
              "knn.ks=[3, 5]", "knn.figures=true"]
    on_folder = knn.main(["--checkpoint", str(folder), f"data.root={tiny_data}", *common])
    on_shards = knn.main(["--checkpoint", str(sharded_run), f"data.root={sharded}", "data.format=shards", *common])
    numbers = [k for k in on_folder if k.startswith(("knn.", "retrieval."))]
    assert numbers and {k: on_folder[k] for k in numbers} == {k: on_shards[k] for k in numbers}
    assert (sharded_run / "eval" / "figures" / "knn_neighbours.png").is_file()  # its images come from the shards


def test_mid_epoch_resume_from_shards_is_exact(straight_runs: tuple[Path, Path], sharded: Path,
                                               tmp_path: Path) -> None:
    """Stopped at step 2 (of 3 an epoch) with two loader workers, resumed: bitwise the uninterrupted run (which
    read the shards in the main process)."""
    cfg = tiny_config(sharded, tmp_path / "resumed", max_steps=2, figure_samples=0)
    cfg.data.format, cfg.data.num_workers, cfg.data.augment_on = "shards", 2, "device"
    resumed = pretrain(cfg)
    cfg.resume, cfg.train.max_steps = "auto", 0
    pretrain(cfg)
    (model_a, optim_a, metrics_a), (model_b, optim_b, metrics_b) = final_state(straight_runs[1]), final_state(resumed)
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert_same_optimizer(optim_a, optim_b)
    assert metrics_a == metrics_b and [m["step"] for m in metrics_a] == [1, 2, 3, 4, 5, 6]


def test_online_evaluations_read_labelled_shards(sharded: Path, tiny_data: Path) -> None:
    """eval_data.format=shards: a run on unlabelled images has its online kNN and keep precision read labelled
    shards (the key was refused before)."""
    overrides = [f"data.root={tiny_data / 'images'}", "data.format=folder", f"eval_data.root={sharded}",
                 "eval_data.format=shards", "eval_data.train_split=train"]
    data = evaluation_data(load_config(None, overrides, PretrainConfig))
    bank = build_dataset(data, data.train_split)
    assert isinstance(bank, ShardDataset) and bank.num_classes == 3 and len(bank) == 24


def test_cached_features_follow_the_shards(sharded: Path, tmp_path: Path) -> None:
    """The feature cache's key stamps each image by its shard: shards written again in the same place (other
    bytes, other time) give another key, so eval.knn does not reuse features of the old images."""
    copy = tmp_path / "shards"
    shutil.copytree(sharded, copy)
    key = cache_key("w", ShardDataset(str(copy), "train"), "train", "t", "cls", 4)
    shard = copy / "train-000000.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert cache_key("w", ShardDataset(str(copy), "train"), "train", "t", "cls", 4) != key


def test_a_pickled_dataset_opens_its_own_shards(sharded: Path) -> None:
    """A DataLoader worker started by spawn gets the dataset pickled: without the parent's file descriptors (their
    numbers mean nothing in another process), it opens the shards itself."""
    dataset = ShardDataset(str(sharded), "train")
    first = np.asarray(dataset[0][0])
    assert dataset._fds
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._fds == {} and np.array_equal(np.asarray(copy[0][0]), first) and copy._fds
