"""Case 4, bad configuration: an unknown key, a wrong type, a missing file or data folder, a `_base_`
cycle, an invalid data.on_bad_image, a number out of its range and two keys that contradict each other
each stop train_ssl.py with exit code 2 and one `error:` line naming the key or file, before anything
is trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslfg.commands import finetune as finetune_cli
from sslfg.commands import pretrain as train_ssl
from sslfg.models.heads import check_batch_norm
from tests.conftest import tiny_method
from tests.reliability.outcomes import user_error
from tests.reliability.procs import finetune_args, pretrain_args

# (files to write in tmp_path, command-line arguments ({tmp} = tmp_path), what the message must name)
CASES = {
    "unknown key in a file": (
        {"recipe.yaml": "method:\n  local:\n    keep_ratoi: 0.5\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["unknown key 'method.local.keep_ratoi'", "{tmp}/recipe.yaml", "did you mean 'method.local.keep_ratio'"]),
    "unknown section on the command line": (
        {}, ["trian.epochs=3"], ["unknown key 'trian'", "command line"]),
    "wrong type in a file": (
        {"recipe.yaml": "train:\n  epochs: ten\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["train.epochs: expected int, got str 'ten'", "{tmp}/recipe.yaml"]),
    "wrong type on the command line": (
        {}, ["train.betas=0.9"], ["train.betas: expected", "got float 0.9", "command line"]),
    "invalid on_bad_image": (
        {}, ["data.on_bad_image=ignore"], ["data.on_bad_image: expected one of 'error', 'skip'", "'ignore'"]),
    "missing --config file": (
        {}, ["--config", "{tmp}/nope.yaml"], ["cannot read config file {tmp}/nope.yaml"]),
    "missing _base_ file": (
        {"recipe.yaml": "_base_: gone.yaml\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["cannot read config file {tmp}/gone.yaml", "a `_base_` of {tmp}/recipe.yaml"]),
    "_base_ cycle": (
        {"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: [a.yaml]\n"}, ["--config", "{tmp}/a.yaml"],
        ["`_base_` cycle: {tmp}/a.yaml -> {tmp}/b.yaml -> {tmp}/a.yaml"]),
    "invalid YAML": (
        {"recipe.yaml": "train: {epochs: 3\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["invalid YAML in {tmp}/recipe.yaml: expected ',' or '}}', but got '<stream end>' at line 2, column 1"]),
    "batch size 0 in a file": (
        {"recipe.yaml": "train:\n  batch_size: 0\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["train.batch_size: expected an integer ≥ 1, got 0 (in {tmp}/recipe.yaml)"]),
    "zero epochs on the command line": (
        {}, ["train.epochs=0"], ["train.epochs: expected an integer ≥ 1, got 0 (in command line)"]),
    "keep_ratio 0": (
        {}, ["method.local.keep_ratio=0"],
        ["method.local.keep_ratio: expected a number in (0, 1], got 0 (in command line)"]),
    "probability above 1": (
        {"recipe.yaml": "augment: {blur_p: [1.0, 1.5]}\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["augment.blur_p[1]: expected a number in [0, 1], got 1.5 (in {tmp}/recipe.yaml)"]),
    "not-a-number temperature": (
        {}, ["method.mocov3.temperature=.nan"],
        ["method.mocov3.temperature: expected a number > 0, got nan (in command line)"]),
    "crop scale bounds reversed": (
        {}, ["augment.crop_scale=[0.9, 0.2]"],
        ["augment.crop_scale: expected lower ≤ upper, got [0.9, 0.2] (in command line)"]),
    "patch size that does not divide the image size": (
        {"recipe.yaml": "data: {image_size: 30}\n"}, ["--config", "{tmp}/recipe.yaml", "model.patch_size=4"],
        ["model.patch_size = 4 must divide data.image_size = 30", "model.patch_size in command line",
         "data.image_size in {tmp}/recipe.yaml"]),
    "warmup as long as the run": (
        {"recipe.yaml": "train: {warmup_epochs: 10}\n"}, ["--config", "{tmp}/recipe.yaml", "train.epochs=10"],
        ["train.warmup_epochs = 10.0 must be below train.epochs = 10", "never leave warmup",
         "train.warmup_epochs in {tmp}/recipe.yaml", "train.epochs in command line"]),
    "a section twice in a file": (
        {"recipe.yaml": "train:\n  epochs: 3\nseed: 1\ntrain:\n  batch_size: 4\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["train: set twice, on lines 1 and 4", "remove one of them", "(in {tmp}/recipe.yaml)"]),
    "a key twice inside a block of a _base_": (
        {"base.yaml": "train:\n  epochs: 3\n  epochs: 4\n", "recipe.yaml": "_base_: base.yaml\n"},
        ["--config", "{tmp}/recipe.yaml"],
        ["train.epochs: set twice, on lines 2 and 3", "(in {tmp}/base.yaml (a `_base_` of {tmp}/recipe.yaml))"]),
    "a key twice in a flow mapping on the command line": (
        {}, ["model.kwargs={{depth: 2, depth: 3}}"], ["model.kwargs.depth: set twice", "(in command line)"]),
    "a flow mapping without a space on the command line": (
        {}, ["model.kwargs={{depth:3}}"],
        ["model.kwargs.depth:3: inside {{...}} a colon needs a space after it", "write {{depth: 3}}", "command line"]),
    "a flow mapping without a space in a file": (
        {"recipe.yaml": "model:\n  kwargs: {embed_dim: 32, depth:3}\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["model.kwargs.depth:3:", "write {{depth: 3}}", "(in {tmp}/recipe.yaml)"]),
    "a Latin-1 comment": (
        {"recipe.yaml": "train:\n  # r\xe9glage\n  epochs: 3\n".encode("latin-1")}, ["--config", "{tmp}/recipe.yaml"],
        ["{tmp}/recipe.yaml is not UTF-8 text: line 2, byte 12 is 0xe9", "iconv -f latin1 -t utf-8 {tmp}/recipe.yaml"]),
    "a binary file as --config": (
        {"photo.png": b"\x89PNG\r\n\x1a\n\x00\x00"}, ["--config", "{tmp}/photo.png"],
        ["{tmp}/photo.png is not UTF-8 text: line 1, byte 0 is 0x89", "must be UTF-8 YAML text"]),
    "a binary file that is valid UTF-8": (
        {"zeros.bin": b"train: 1\n\x00\x00"}, ["--config", "{tmp}/zeros.bin"],
        ["{tmp}/zeros.bin is not YAML text: character 0x00 at character 9 is not allowed in YAML"]),
    "a binary file as a _base_": (
        {"photo.png": b"\x89PNG\r\n", "recipe.yaml": "_base_: photo.png\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["{tmp}/photo.png is not UTF-8 text", "A recipe (a `_base_` of {tmp}/recipe.yaml) must be UTF-8"]),
    "a top-level key under a section": (
        {}, ["train.seed=0"], ["unknown key 'train.seed' (in command line); did you mean 'seed'?"]),
    "a key of another section": (
        {"recipe.yaml": "data:\n  epochs: 3\n"}, ["--config", "{tmp}/recipe.yaml"],
        ["unknown key 'data.epochs' (in {tmp}/recipe.yaml); did you mean 'train.epochs'?"]),
}


@pytest.mark.parametrize("files, argv, named", CASES.values(), ids=CASES.keys())
def test_bad_config_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       files: dict[str, str | bytes], argv: list[str], named: list[str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "run"
    message = user_error(train_ssl.main, [a.format(tmp=tmp_path) for a in argv] + [f"output_dir={out}"], capsys)
    for text in named:
        assert text.format(tmp=tmp_path) in message
    assert "\n" not in message  # one line, PyYAML's quoted source lines included
    assert not out.exists()  # stopped while reading the config: not even the run directory was made


def test_data_root_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    message = user_error(train_ssl.main, pretrain_args(tmp_path / "nowhere", out), capsys)
    assert "data.root does not exist" in message and str(tmp_path / "nowhere") in message
    assert "`make data` builds the bundled data/sample and data/cluttered" in message  # the step that builds either
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_finetune_warmup_as_long_as_the_run(tiny_data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    # 24 training images, batch 8, 1 epoch: 3 optimizer steps, all of them warmup
    out = tmp_path / "run"
    args = finetune_args(tiny_data, out, **{"train.epochs": 1, "train.warmup_steps": 3})
    message = user_error(finetune_cli.main, args, capsys)
    assert message.startswith("train.warmup_steps: 3 warmup steps are not fewer than the run's 3 optimizer steps")
    assert "(in command line)" in message and "set train.warmup_steps below 3" in message
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_timm_default_patch_size_that_does_not_divide_the_image_size(tiny_data: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = pretrain_args(tiny_data, out, **{"model.patch_size": 0, "data.image_size": 20})  # vit_tiny: patch 16
    message = user_error(train_ssl.main, args, capsys)
    assert message.startswith("data.image_size: 20 is not a multiple of the patch size 16 of vit_tiny_patch16_224")
    assert "use a data.image_size of 16 or 32, or set model.patch_size to a divisor of 20" in message
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("kwargs, named", [
    ("{embed_dim: 32, depth: 2, num_heads: 2, dpeth: 3}", "model.kwargs: timm's 'vit_tiny_patch16_224' takes no "
                                                          "argument 'dpeth'; did you mean 'depth'?"),
    ("{embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: null}", "model.kwargs: 'mlp_ratio' has no value (null), "
                                                                "which timm would silently ignore"),
], ids=["unknown", "null"])
def test_model_kwargs_timm_would_ignore_are_refused(tiny_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], kwargs: str, named: str) -> None:
    args = [*pretrain_args(tiny_data, tmp_path / "run", **{"model.kwargs": kwargs}), "--check"]
    message = user_error(train_ssl.main, args, capsys)
    assert message.startswith(named)


@pytest.mark.parametrize("method", ["mocov3", "byol"])
def test_batch_of_one_through_batch_norm_heads_is_refused(tiny_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str], method: str) -> None:
    # one process: the heads' batch norm would see one sample per step, which torch refuses mid-step
    for check in (["--check"], []):
        out = tmp_path / f"run{len(check)}"
        args = [*pretrain_args(tiny_data, out, batch=1, **{"method.name": method}), *check]
        message = user_error(train_ssl.main, args, capsys)
        assert message.startswith("train.batch_size: 1 image per process × 1 process gives the batch norm layers")
        assert "needs at least 2" in message and "set train.batch_size=2 or more" in message
        assert "method.name=dino" in message
        assert not (out / "checkpoints").exists()


def test_batch_of_one_without_per_sample_batch_norm_trains(tiny_data: Path, tmp_path: Path) -> None:
    # DINO's head has no batch norm; ILA's normalises over tokens and pixels; two processes share the heads' statistics
    assert train_ssl.main(pretrain_args(tiny_data, tmp_path / "dino", batch=1, **{
        "method.name": "dino", "train.max_steps": 2})) is None
    assert finetune_cli.main(finetune_args(tiny_data, tmp_path / "ila", batch=1, **{
        "model.adapter": "ila", "model.head": "vit", "model.adapter_positions": "[0]", "train.max_steps": 2})) is None
    check_batch_norm(tiny_method("mocov3"), batch_size=1, num_processes=2)
