"""Linear probe: the fast sweep on tensors (accuracy, selection on validation only, batched heads exact),
and eval.linear end to end in both modes (metrics file, protocol, exact resume, user errors)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sslfg.cli import run_cli
from sslfg.commands import linear
from sslfg.engine.schedules import cosine_schedule
from sslfg.evaluation.linear import LinearHeads, epoch_batches, fast_probe, lrs_beyond, train_heads
from sslfg.evaluation.selection import stratified_holdout
from sslfg.schema import LinearConfig
from sslfg.verdicts import correct_path, read_correct
from sslfg.weights import create_vit

TINY = ("--random-init", "--model", "vit_tiny_patch16_224",
        "model_kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}")
PROTOCOL_KEYS = ("mode", "lr", "epochs", "batch_size", "selection_split", "train_split", "test_split")
LIN = LinearConfig(epochs=10, batch_size=32, lrs=[1e-4, 0.1, 1.0, 10.0])


def blobs(n: int, seed: int, classes: int = 4, dim: int = 16, noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed class centres (norm ~8) plus N(0, noise²): linearly separable at the default noise."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.arange(n) % classes
    return centres[labels] + noise * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), labels


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    fit, val, test = blobs(160, 1), blobs(80, 2), blobs(200, 3)
    return {"fit": fit, "val": val, "train": (torch.cat([fit[0], val[0]]), torch.cat([fit[1], val[1]])), "test": test}


def test_fast_probe_separates_and_selects_on_validation_only(splits: dict) -> None:
    s = splits
    result = fast_probe(s["fit"], s["val"], s["train"], s["test"], LIN, seed=0)
    assert result.top1 > 0.95 and result.top5 == 1.0
    assert result.lr == max(result.val_top1, key=result.val_top1.get)  # the first lr of best validation top-1
    # Test features and labels replaced by noise: the choice and the validation scores do not move.
    noise = (torch.randn_like(s["test"][0]) * 100, torch.randint(0, 4, s["test"][1].shape))
    blind = fast_probe(s["fit"], s["val"], s["train"], noise, LIN, seed=0)
    assert (blind.lr, blind.val_top1) == (result.lr, result.val_top1)
    # Validation labels only an untrained head agrees with: the sweep follows validation to the smallest
    # lr, although on test it is the worst one.
    untrained = LinearHeads(16, 4, seed=0)(s["val"][0])[0].argmax(dim=1)
    misled = fast_probe(s["fit"], (s["val"][0], untrained), s["train"], s["test"], replace(LIN, extend_grid=0), seed=0)
    assert misled.lr == 1e-4 and misled.val_top1[1e-4] == 1.0 and misled.top1 < 0.5
    # ... and that choice is at the edge of the grid: said, with the way out; an inner choice says nothing.
    assert misled.edge_warning == ("linear.lrs: the chosen lr 0.0001 is the smallest of the grid [0.0001, 0.1, 1.0, "
                                   "10.0]; a better one may lie below it: extend linear.lrs")
    assert result.lr in (0.1, 1.0) and result.edge_warning == ""
    assert result.hits.shape == (200,) and result.hits.double().mean().item() == result.top1


def test_lrs_beyond_continue_the_grid_spacing() -> None:
    assert lrs_beyond([0.001, 0.003, 0.01, 0.03], "smallest", 3) == [0.0003, 0.0001, 3e-05]
    assert lrs_beyond([0.3, 1.0, 3.0], "largest", 3) == [10.0, 30.0, 100.0]
    assert lrs_beyond([1.0, 2.0], "largest", 2) == [4.0, 8.0]  # two lrs: their one ratio


@pytest.fixture(scope="module")
def noisy() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fit, val, train, test of overlapping blobs: val top-1 rises with the lr up to ~0.1-1 (10 epochs, batch 32),
    then falls a little."""
    fit, val, test = (blobs(n, seed, noise=2.0) for n, seed in ((160, 1), (160, 2), (400, 3)))
    return [fit, val, (torch.cat([fit[0], val[0]]), torch.cat([fit[1], val[1]])), test]


@pytest.mark.parametrize("lrs", [[1e-5, 3e-5, 1e-4], [10.0, 30.0, 100.0]], ids=["best_above", "best_below"])
def test_grid_extends_past_its_end_until_the_best_is_inside(noisy: list, lrs: list[float]) -> None:
    lin = LinearConfig(epochs=10, batch_size=32, lrs=lrs, extend_grid=12)
    today = fast_probe(*noisy, replace(lin, extend_grid=0), seed=0)
    assert list(today.val_top1) == lrs and today.lr in (min(lrs), max(lrs)) and today.edge_warning
    result = fast_probe(*noisy, lin, seed=0)
    swept = sorted(result.val_top1)
    assert 0 < result.extended <= 12 and not result.at_bound and result.edge_warning == ""
    assert min(swept) < result.lr < max(swept) and result.lr not in lrs  # an interior lr, past the old grid
    assert max(result.val_top1.values()) > max(today.val_top1.values()) and result.top1 > today.top1
    assert {lr: result.val_top1[lr] for lr in lrs} == today.val_top1  # the grid's own heads do not move
    # The bound: 2 more lrs, the chosen one still at the end; said, with the grid swept and the bound.
    bounded = fast_probe(*noisy, replace(lin, extend_grid=2), seed=0)
    assert bounded.extended == 2 and bounded.at_bound and len(bounded.val_top1) == 5
    side = "largest" if lrs[0] < 1 else "smallest"
    assert bounded.edge_warning.startswith(f"linear.lrs: the chosen lr {bounded.lr:g} is the {side} of the grid "
                                           f"{sorted(bounded.val_top1)} (linear.extend_grid=2 lrs swept past")


def test_class_ids_with_gaps_give_the_same_probe(splits: dict) -> None:
    s = splits
    gaps = {k: (x, y * 10 + 3) for k, (x, y) in s.items()}  # ids {3, 13, 23, 33}
    a = fast_probe(s["fit"], s["val"], s["train"], s["test"], LIN, seed=0)
    b = fast_probe(gaps["fit"], gaps["val"], gaps["train"], gaps["test"], LIN, seed=0)
    assert (a.lr, a.val_top1, a.top1, a.top5) == (b.lr, b.val_top1, b.top1, b.top5)


def test_batched_heads_equal_independent_runs() -> None:
    x, y = blobs(50, 0, classes=3, dim=8)
    lrs, epochs, batch, momentum, wd = [0.01, 0.3, 2.0], 3, 16, 0.9, 0.05
    heads = train_heads(x, y, 3, lrs, epochs, batch, momentum, wd, seed=7)
    schedule = cosine_schedule(1.0, 0.0, epochs * 4)  # 50 samples, batch 16: 3 full batches and one of 2
    for head, lr in enumerate(lrs):
        ref = torch.nn.Linear(8, 3)  # an independent reference: nn.Linear and torch's SGD, same recipe
        with torch.no_grad():
            ref.weight.copy_(torch.randn(8, 3, generator=torch.Generator().manual_seed(7)).T * 0.01)
            ref.bias.zero_()
        opt = torch.optim.SGD([{"params": [ref.weight], "weight_decay": wd}, {"params": [ref.bias], "weight_decay": 0}],
                              lr=lr, momentum=momentum)
        step = 0
        for epoch in range(epochs):
            for idx in epoch_batches(len(x), batch, seed=7, epoch=epoch):
                for group in opt.param_groups:
                    group["lr"] = lr * float(schedule[step])
                opt.zero_grad()
                F.cross_entropy(ref(x[idx]), y[idx]).backward()
                opt.step()
                step += 1
        assert step == 12
        torch.testing.assert_close(heads.weights[head].detach(), ref.weight.detach().T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads.biases[head].detach(), ref.bias.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(heads.weights[0], heads.weights[1])


def test_stratified_holdout() -> None:
    labels = torch.tensor([42] * 20 + [3] * 10 + [17] * 1)
    keep, held = stratified_holdout(labels, 0.1, seed=0)
    assert sorted(keep.tolist() + held.tolist()) == list(range(31))
    assert [int((labels[held] == c).sum()) for c in (42, 3, 17)] == [2, 1, 0]  # a class of one is kept
    assert torch.equal(held, stratified_holdout(labels, 0.1, seed=0)[1])
    assert not torch.equal(held, stratified_holdout(labels, 0.1, seed=1)[1])


def tiny_args(root: Path, out: Path, *extra: str, backbone: tuple[str, ...] = TINY) -> list[str]:
    return [*backbone, f"data.root={root}", "data.image_size=16", "data.num_workers=0", "data.num_classes=3",
            f"output_dir={out}", "linear.epochs=2", "linear.batch_size=8", "features.batch_size=16", *extra]


@pytest.fixture(scope="module")
def val_data(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_data with the GLSim split set: train (18) + val (6) = train_val (24), and test."""
    root = tmp_path_factory.mktemp("val_data")
    (root / "images").symlink_to(tiny_data / "images")
    header, *rows = (tiny_data / "train.csv").read_text().splitlines()
    for name, part in (("train", rows[:18]), ("val", rows[18:]), ("train_val", rows)):
        (root / f"{name}.csv").write_text("\n".join([header, *part]) + "\n")
    shutil.copy(tiny_data / "test.csv", root / "test.csv")
    return root


def check_result(result: dict, mode: str) -> None:
    assert 0 <= result["linear.top1"] <= 1 and 0 <= result["linear.top5"] <= 1
    assert all(f"protocol.{k}" in result for k in PROTOCOL_KEYS) and result["protocol.mode"] == mode
    assert result["protocol.test_split"] == "test" and result["init"] == "random"


def test_fast_mode_end_to_end(tiny_data: Path, val_data: Path, tmp_path: Path,
                              caplog: pytest.LogCaptureFixture) -> None:
    copy = tmp_path / "copy.json"
    assert run_cli(linear.main, [*tiny_args(tiny_data, tmp_path / "a"), "--output", str(copy)]) == 0
    result = json.loads((tmp_path / "a" / "linear.json").read_text())
    assert result == json.loads(copy.read_text())
    check_result(result, "fast")
    assert result["protocol.selection_split"].startswith("train_val (stratified 0.1 held out")
    assert result["protocol.val_size"] == 3 and result["protocol.train_size"] == 24
    assert result["protocol.lr"] in result["protocol.lrs"]

    hits = read_correct(correct_path(tmp_path / "a", "linear"), "linear.top1")
    assert len(hits) == 8 and hits.mean() == pytest.approx(result["linear.top1"])
    # two lrs: the choice is always at an edge, warned in the log and the json
    with caplog.at_level(logging.WARNING, logger="sslfg.evaluation.linear"):
        edge = linear.main(tiny_args(tiny_data, tmp_path / "c", "linear.lrs=[0.01, 0.1]", "linear.extend_grid=0"))
    assert edge["protocol.lr_warning"].startswith(f"linear.lrs: the chosen lr {edge['protocol.lr']:g} is the")
    assert edge["protocol.lr_warning"] in caplog.text

    result = linear.main(tiny_args(val_data, tmp_path / "b"))
    check_result(result, "fast")
    assert (result["protocol.selection_train_split"], result["protocol.selection_split"]) == ("train", "val")
    assert (result["protocol.fit_size"], result["protocol.val_size"], result["protocol.train_size"]) == (18, 6, 24)


def test_full_mode_end_to_end_resumes_exactly(tiny_data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = tiny_args(tiny_data, tmp_path, "linear.mode=full")
    straight = linear.main(args)  # 24 images, batch 8: 3 steps per epoch, a checkpoint after each epoch
    check_result(straight, "full")
    assert straight["protocol.selection_split"].startswith("none") and straight["protocol.steps"] == 6
    run = tmp_path / "linear_full"
    last = run / "checkpoints" / "step_00000006"
    head, logged = load_file(str(last / "model.safetensors")), (run / "metrics.jsonl").read_text()

    assert run_cli(linear.main, args) == 2  # a fresh run would overwrite the checkpoints
    assert "linear.resume=auto" in capsys.readouterr().err

    shutil.rmtree(last)  # interrupted after the first epoch
    weights = tmp_path / "other.safetensors"  # another backbone of the same shape: its head is not continued
    vit = create_vit("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2,
                                              "num_heads": 2})
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    other = tiny_args(tiny_data, tmp_path, "linear.mode=full", "linear.resume=auto",
                      backbone=("--checkpoint", str(weights), *TINY[1:]))
    assert run_cli(linear.main, other) == 2
    err = capsys.readouterr().err
    assert "linear.resume:" in err and f"checkpoint:  → {weights}" in err and "random_init: True → False" in err, err
    resumed = linear.main([*args, "linear.resume=auto"])
    assert resumed["protocol.resumed_from_step"] == 3
    assert resumed["linear.top1"] == straight["linear.top1"] and resumed["linear.top5"] == straight["linear.top5"]
    again = load_file(str(last / "model.safetensors"))
    assert head.keys() == again.keys() and all(torch.equal(head[k], again[k]) for k in head)
    assert (run / "metrics.jsonl").read_text() == logged


def test_user_errors_are_one_line(tiny_data: Path, val_data: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(linear.main, tiny_args(tiny_data, tmp_path / "out", "data.test_split=nosuch")) == 2
    assert "nosuch.csv" in capsys.readouterr().err

    empty = tmp_path / "empty_val"
    shutil.copytree(val_data, empty, symlinks=True)
    (empty / "val.csv").write_text("class_id,dir\n")
    assert run_cli(linear.main, tiny_args(empty, tmp_path / "out")) == 2
    assert "val.csv has a header but no data rows" in capsys.readouterr().err

    assert run_cli(linear.main, tiny_args(val_data, tmp_path / "out", "data.val_split=test")) == 2
    assert "data.val_split: 'test' is also data.test_split" in capsys.readouterr().err

    weights = tmp_path / "narrow.safetensors"  # width 32, loaded as width 48
    vit = create_vit("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2,
                                              "num_heads": 2})
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    wide = ("--checkpoint", str(weights), "--model", "vit_tiny_patch16_224",
            "model_kwargs={patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}")
    assert run_cli(linear.main, tiny_args(tiny_data, tmp_path / "out", backbone=wide)) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "narrow.safetensors" in err
