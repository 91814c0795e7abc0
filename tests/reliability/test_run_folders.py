"""Case 12, run folders and checkpoints (issue 22): a failed resume changes nothing, a run never writes
into the current folder or over files it did not create, one run owns a folder at a time, a checkpoint
that lost or cut short a file is refused naming the previous complete one, a full disk (file-size limit)
during a checkpoint write loses nothing, and a second Ctrl-C after the clean stop is ignored."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sslfg.commands import embed, knn, linear
from sslfg.commands import export as export_cli
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import pretrain as train_ssl
from sslfg.data import shards as shards_module
from sslfg.engine import checkpoint as checkpoint_module
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.engine.preemption import Interrupted, StopSignals
from sslfg.engine.rundir import LOCK_FILE, WRITE_PROBE, claim_run_dir, release_run_dir
from sslfg.study import run as study_module
from tests.reliability.outcomes import user_error
from tests.reliability.procs import (
    ENV,
    ROOT,
    TIMEOUT,
    command,
    finetune_args,
    pretrain_args,
    pretraining,
    start,
    wait_for_step,
    workers,
)
from tests.test_eval_knn import TINY, data_args
from tests.test_study import write_recipes


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, but the lock file's record of its latest owner."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def run(cmd: list[str], prefix: str = "") -> subprocess.CompletedProcess:
    """`cmd` (procs.command) to its end, optionally after a shell `prefix` (e.g. a ulimit)."""
    argv = ["bash", "-c", f'{prefix}exec "$@"', "bash", *cmd] if prefix else cmd
    return subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a command that failed as a user error (exit 2, no traceback)."""
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return line


@pytest.fixture(scope="module")
def two_checkpoints(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining run stopped after 2 steps with checkpoints step_1 and step_2."""
    out = tmp_path_factory.mktemp("two_checkpoints") / "run"
    assert train_ssl.main(pretrain_args(tiny_data, out, **{"train.max_steps": 2, "train.checkpoint_every": 1,
                                                            "train.keep_checkpoints": 2})) is None
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000001", "step_00000002"]
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---- item 1: a failed resume changes nothing ----------------------------------------------------------------

def test_resume_with_another_architecture_is_refused_and_changes_nothing(two_checkpoints: Path, tiny_data: Path,
                                                                         tmp_path: Path) -> None:
    """Old code: config.yaml was rewritten with depth 3 before the state_dict traceback."""
    out = copy_run(two_checkpoints, tmp_path)
    before = snapshot(out)
    args = pretrain_args(tiny_data, out, **{"model.kwargs": "{embed_dim: 32, depth: 3, num_heads: 2}",
                                            "resume": "auto"})
    message = one_error(run(command(["train_ssl.py", *args])))
    assert "model.kwargs.depth: 2 → 3" in message and "drop those overrides" in message, message
    assert snapshot(out) == before


def test_resume_with_another_method_names_the_keys(two_checkpoints: Path, tiny_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_run(two_checkpoints, tmp_path)
    before = snapshot(out)
    message = user_error(train_ssl.main, pretrain_args(tiny_data, out, **{"method.name": "byol",
                                                                          "resume": "auto"}), capsys)
    assert "method.name: mocov3 → byol" in message and "another output_dir" in message, message
    assert snapshot(out) == before


@pytest.mark.parametrize("resume", ["auto", "other"], ids=["own_run", "other_run"])
def test_resume_at_another_image_size_is_refused(resume: str, two_checkpoints: Path, tiny_data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: a traceback (size mismatch for encoder.pos_embed) when data.image_size differed from the run's,
    whether resuming its own run (resume=auto) or another run's checkpoint folder."""
    out = copy_run(two_checkpoints, tmp_path)
    before = snapshot(out)
    if resume == "other":
        resume, out = str(checkpoint_dirs(out)[-1]), tmp_path / "new"
    message = user_error(train_ssl.main, pretrain_args(tiny_data, out, **{"data.image_size": 8, "resume": resume}),
                         capsys)
    assert "data.image_size: 16 → 8" in message and "drop those overrides" in message, message
    assert snapshot(tmp_path / "run") == before


def test_check_refuses_what_the_run_refuses_with_its_message(two_checkpoints: Path, tiny_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: `--check` skipped what the run refuses when it opens its folder: `resume=foo` (no such checkpoint)
    passed --check and the run failed; so did a fresh run over a run's checkpoints, an eval_only fine-tune with
    no checkpoint, and eval.linear's full-mode linear.resume, an empty linear.lrs and a batch larger than the
    training split (refused only after the features were extracted). Now --check fails with the run's message,
    and the run fails before it creates anything."""
    run_dir = copy_run(two_checkpoints, tmp_path)
    before = snapshot(run_dir)
    linear_args = ["--random-init", "--model", "vit_tiny_patch16_224", *TINY, *data_args(tiny_data)]
    nosuch, notes = tmp_path / "nosuch", tmp_path / "notes"
    notes.mkdir()
    (notes / "metrics.jsonl").write_text("mine\n")
    for main, args, expected in (
        (train_ssl.main, pretrain_args(tiny_data, tmp_path / "new", resume=nosuch),
         f"resume: '{nosuch}' does not exist; give a checkpoint folder (<run>/checkpoints/step_*), resume=auto for "
         f"the newest in {tmp_path / 'new'}, or leave resume unset for a new run"),
        (train_ssl.main, pretrain_args(tiny_data, tmp_path / "new", resume=tiny_data),
         f"resume: '{tiny_data}' is not a complete sslfg checkpoint (no train_state.json in it); give"),
        (train_ssl.main, pretrain_args(tiny_data, run_dir, resume=nosuch),
         f"does not exist; give a checkpoint folder (<run>/checkpoints/step_*, e.g. {checkpoint_dirs(run_dir)[-1]})"),
        (train_ssl.main, pretrain_args(tiny_data, run_dir), f"output_dir: '{run_dir}' already holds checkpoints; "
         "continue that run with `resume=auto`"),
        (finetune_cli.main, finetune_args(tiny_data, run_dir), f"output_dir: '{run_dir}' holds a pretrain run ("),
        (train_ssl.main, pretrain_args(tiny_data, notes), f"{notes / 'metrics.jsonl'}, which no sslfg run wrote"),
        (finetune_cli.main, finetune_args(tiny_data, tmp_path / "ft", eval_only="true"),
         f"eval_only: no checkpoint in {tmp_path / 'ft' / 'checkpoints'}; train first or set resume=PATH"),
        (linear.main, [*linear_args, f"output_dir={tmp_path / 'lin'}", "linear.mode=full", "linear.batch_size=8",
                       f"linear.resume={nosuch}"],
         f"linear.resume: '{nosuch}' does not exist; give a checkpoint folder (<run>/checkpoints/step_*), "
         f"linear.resume=auto for the newest in {tmp_path / 'lin' / 'linear_full'}"),
        (linear.main, [*linear_args, f"output_dir={tmp_path / 'lin'}", "linear.lrs=[]"], "linear.lrs is empty"),
        (linear.main, [*linear_args, f"output_dir={tmp_path / 'lin'}", "linear.mode=full", "linear.batch_size=64"],
         "linear.batch_size: train has 24 images, fewer than one batch (64 × 1 processes)"),
    ):
        checked = user_error(main, [*args, "--check"], capsys)
        assert expected in checked and user_error(main, args, capsys) == checked, (checked, expected)
    assert snapshot(run_dir) == before
    assert not (tmp_path / "new").exists()  # a resume that cannot be is refused before the folder is made


# ---- item 2: where a run may write --------------------------------------------------------------------------

@pytest.mark.parametrize("check", [[], ["--check"]], ids=["run", "check"])
@pytest.mark.parametrize("output_dir", ["", ".", "./", "..", "CWD"])
def test_output_dir_that_is_empty_or_the_current_folder_is_refused(output_dir: str, check: list[str], tiny_data: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: `output_dir=` (an unset shell variable) trained in the current folder, replacing its files
    (and --check passed it)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text("my: notes\n")
    (work / "summary.json").write_text("{}\n")
    monkeypatch.chdir(work)
    value = str(work) if output_dir == "CWD" else output_dir
    for main, args in ((train_ssl.main, [*pretrain_args(tiny_data, Path("x"), **{"output_dir": value}), *check]),
                       (knn.main, ["--random-init", "--model", "vit_tiny_patch16_224", *TINY, *data_args(tiny_data),
                                   f"output_dir={value}", *check])):
        message = user_error(main, args, capsys)
        assert "output_dir" in message and "runs/my_run" in message, message
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "summary.json", "work"]


@pytest.mark.parametrize("inside", [False, True], ids=["a file", "inside a file"])
def test_output_dir_that_is_a_file_is_refused_by_check_too(inside: bool, tiny_data: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: --check passed `output_dir=<a file>` and the run then stopped on 'cannot write ... (Not a
    directory)'."""
    (tmp_path / "afile").write_text("notes\n")
    out = tmp_path / "afile" / "run" if inside else tmp_path / "afile"
    for main, args in ((train_ssl.main, pretrain_args(tiny_data, out)),
                       (knn.main, ["--random-init", "--model", "vit_tiny_patch16_224", *TINY, *data_args(tiny_data),
                                   f"output_dir={out}"])):
        for check in (["--check"], []):
            message = user_error(main, [*args, *check], capsys)
            assert message.startswith(f"output_dir: '{out}' "), message
            assert ("is inside" if inside else "is a file") in message and "not a folder" in message
    assert (tmp_path / "afile").read_text() == "notes\n"


@pytest.mark.parametrize("command", ["pretrain", "knn", "export", "shards"])
def test_an_output_path_starting_with_a_tilde_is_refused(command: str, tiny_data: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: `output_dir=~/runs/x` (no shell expands ~ after '=') wrote a folder named '~' into the current
    folder, exit 0; so did the shard writer's and the export's --out."""
    monkeypatch.chdir(tmp_path)
    key, argv = {
        "pretrain": ("output_dir", (train_ssl.main, pretrain_args(tiny_data, Path("~/runs/x")))),
        "knn": ("output_dir", (knn.main, ["--random-init", "--model", "vit_tiny_patch16_224", *TINY,
                                          *data_args(tiny_data), "output_dir=~/runs/x"])),
        "export": ("--out", (export_cli.main, ["--checkpoint", str(tmp_path), "--out", "~/runs/x"])),
        "shards": ("--out", (shards_module.main, ["--config", str(ROOT / "configs" / "datasets" / "sample.yaml"),
                                                  f"data.root={tiny_data}", "--out", "~/runs/x"])),
    }[command]
    main, args = argv
    message = user_error(main, args, capsys)
    assert message.startswith(f"{key}: '~/runs/x' starts with '~'"), message
    assert "$HOME/runs/x" in message and not (tmp_path / "~").exists()


def test_study_in_the_current_folder_is_refused(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: `output_dir=.` wrote the study's files over the recipes of the current folder."""
    recipe = write_recipes(tiny_data, tmp_path, seeds=[0], finetune_arms=False)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    message = user_error(study_module.main, ["--config", str(recipe), "output_dir=."], capsys)
    assert "output_dir: '.'" in message and "runs/my_run" in message, message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("check", [[], ["--check"]], ids=["run", "check"])
@pytest.mark.parametrize("inside", ["", "runs/x"], ids=["root", "below"])
def test_output_dir_in_the_data_folder_is_refused(inside: str, check: list[str], tiny_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: a run with output_dir inside data.root (or eval_data.root) wrote its figures there, and the next
    run on a folder layout trained on them as images; every command now refuses it before writing anything."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    out = data / inside
    before = snapshot(data)
    eval_args = ["--random-init", "--model", "vit_tiny_patch16_224", *TINY, *data_args(data), f"output_dir={out}"]
    for main, args in (
        (train_ssl.main, pretrain_args(data, out)),
        (train_ssl.main, [*pretrain_args(tiny_data, out), f"eval_data.root={data}"]),
        (finetune_cli.main, finetune_args(data, out)),
        (knn.main, eval_args),
        (embed.main, eval_args),
    ):
        message = user_error(main, [*args, *check], capsys)
        assert f"inside the dataset folder '{data}'" in message and "runs/my_run" in message, message
    assert snapshot(data) == before


@pytest.mark.parametrize("files, named", [({"metrics.jsonl": b"mine\n"}, "metrics.jsonl"),
                                          ({"todo.txt": b"x", "photos/cat.jpg": b"y"}, "photos (and 1 more)")],
                         ids=["a run's file name", "unrelated files"])
def test_folder_with_files_no_run_wrote_is_refused(files: dict[str, bytes], named: str, tiny_data: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: a folder holding files of its own, but none named as a run's, was adopted as the run folder."""
    out = tmp_path / "notes"
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    for main, args in ((train_ssl.main, pretrain_args(tiny_data, out)),
                       (knn.main, [*data_args(tiny_data), "features.kind=pixels", f"output_dir={out}"])):
        message = user_error(main, args, capsys)
        assert f"{out / named}" in message and "only into a new or empty folder or one of its own" in message, message
    assert snapshot(out) == files


def test_another_processs_write_probe_is_not_a_foreign_file(tmp_path: Path) -> None:
    """Under several processes the others prove the folder writable while the main one claims it: their probe
    file (in CI, a multi-node run was refused for it) is not someone else's file."""
    (tmp_path / f"{WRITE_PROBE}12345").write_text("")
    claim_run_dir(tmp_path, "pretrain")
    release_run_dir(tmp_path)


def test_a_run_that_fails_at_start_up_leaves_the_folder_as_it_found_it(tiny_data: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A run that failed after claiming its folder (too few images for a batch, an unreadable image) left a folder
    holding only its lock file; now it removes the lock, and the folder when it created it. A folder the user
    made stays, empty, and the next run uses it."""
    bad = Path(shutil.copytree(tiny_data, tmp_path / "bad"))
    (bad / "images" / "train" / "0" / "0000.png").write_bytes(b"not an image")
    for main, args in ((train_ssl.main, lambda out: pretrain_args(tiny_data, out, batch=64)),
                       (finetune_cli.main, lambda out: finetune_args(tiny_data, out, batch=64)),
                       (knn.main, lambda out: [*data_args(bad), "features.kind=pixels", f"output_dir={out}"])):
        new, made = tmp_path / "new" / "run", tmp_path / "made"
        made.mkdir(exist_ok=True)
        for out in (new, made):
            message = user_error(main, args(out), capsys)
            assert "fewer than one optimizer step" in message or "cannot decode image file" in message, message
        assert not new.exists() and new.parent.is_dir()
        assert list(made.iterdir()) == []
    assert train_ssl.main(pretrain_args(tiny_data, made, **{"train.max_steps": 1})) is None
    assert (made / "config.yaml").is_file() and (made / LOCK_FILE).is_file()


def test_folder_of_another_kind_of_command_is_refused(two_checkpoints: Path, tiny_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A fine-tune or an evaluation into a pretraining run's folder would overwrite or mix with its files."""
    out = copy_run(two_checkpoints, tmp_path)
    before = snapshot(out)
    for main, args in ((finetune_cli.main, finetune_args(tiny_data, out)),
                       (knn.main, ["--checkpoint", str(checkpoint_dirs(out)[-1]), *data_args(tiny_data),
                                   f"output_dir={out}"])):
        message = user_error(main, args, capsys)
        assert "holds a pretrain run" in message and f"{out / 'config.yaml'}" in message, message
    assert snapshot(out) == before


# ---- item 3: one run per folder -----------------------------------------------------------------------------

def test_second_run_in_a_folder_is_refused_and_a_killed_run_leaves_no_lock(tiny_data: Path, tmp_path: Path) -> None:
    """The owner runs as 2 gloo processes (only the main one locks); a second run on the same folder is one
    error naming its pid and command line, and so is its --check (which said nothing); after a kill -9 of the
    owner the folder is free again, for --check too. Old code: both ran to exit 0, mixing their files."""
    out = tmp_path / "run"
    owner = start(command(pretraining(tiny_data, out, **{"train.epochs": 100}), processes=2))
    pids = workers(owner)
    try:
        wait_for_step(owner, out, 1)
        assert owner.poll() is None, owner.communicate()[1][-3000:]
        for check in ([], ["--check"]):
            message = one_error(run(command([*pretraining(tiny_data, out, **{"resume": "auto"}), *check])))
            assert any(f"is in use by another run (pid {pid}: " in message for pid in pids), (pids, message)
            assert "train_ssl.py" in message, message
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        owner.kill()
        owner.communicate(timeout=TIMEOUT)
    newest = int(checkpoint_dirs(out)[-1].name.removeprefix("step_"))
    checked = run(command([*pretraining(tiny_data, out, **{"resume": "auto"}), "--check"]))
    assert checked.returncode == 0, checked.stderr[-3000:]
    again = run(command(pretraining(tiny_data, out, **{"resume": "auto", "train.max_steps": newest + 1})))
    assert again.returncode == 0, again.stderr[-3000:]


# ---- items 4, 13 and 17: incomplete and damaged checkpoints -----------------------------------------------

@pytest.mark.parametrize("name", ["random_states_0.pkl", "model.safetensors", "optimizer.bin"])
def test_checkpoint_missing_a_file_is_refused_naming_the_previous_one(name: str, two_checkpoints: Path,
                                                                      tiny_data: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: without random_states_0.pkl the run resumed with fresh RNG (an INFO line); without
    model.safetensors accelerate's traceback named pytorch_model.bin."""
    out = copy_run(two_checkpoints, tmp_path)
    first, last = checkpoint_dirs(out)
    (last / name).unlink()
    message = user_error(train_ssl.main, pretrain_args(tiny_data, out, resume="auto"), capsys)
    assert f"checkpoint {last} is incomplete: {name} is missing" in message, message
    assert f"previous complete checkpoint is {first}: use it with resume={first}" in message, message
    evaluation = ["--checkpoint", str(last), "--random-init", *data_args(tiny_data), f"output_dir={tmp_path / 'e'}"]
    message = user_error(knn.main, evaluation, capsys)
    assert f"{name} is missing" in message and f"checkpoint={first}" in message, message
    resumed = train_ssl.main(pretrain_args(tiny_data, out, **{"resume": first, "train.max_steps": 3}))
    assert resumed is None and checkpoint_dirs(out)[-1].name == "step_00000003"


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors"])
def test_truncated_checkpoint_file_is_called_truncated(name: str, two_checkpoints: Path, tiny_data: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: a truncated optimizer.bin was 'not plain data that loads without running pickled code'."""
    out = copy_run(two_checkpoints, tmp_path)
    first, last = checkpoint_dirs(out)
    data = (last / name).read_bytes()
    (last / name).write_bytes(data[: len(data) - 1000])
    message = user_error(train_ssl.main, pretrain_args(tiny_data, out, resume="auto"), capsys)
    assert "pickled code" not in message and "truncated" in message and f"{last / name}" in message, message
    assert f"previous complete checkpoint is {first}" in message, message


def test_evaluating_a_checkpoint_folder_leaves_it_as_it_was_and_resumable(two_checkpoints: Path, tiny_data: Path,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: eval.knn on <run>/checkpoints/step_N wrote its eval/ folder (with a lock file) into the
    checkpoint, and the resume refused the lock file as 'pickled code', advising to start afresh. Now the
    evaluation writes <run>/eval-step_N, no command writes inside a checkpoint folder, and a file that is not
    the checkpoint's (one its state file does not list) is not judged on resume."""
    out = copy_run(two_checkpoints, tmp_path)
    _, last = checkpoint_dirs(out)
    before = snapshot(last)
    evaluation = ["--checkpoint", str(last), *data_args(tiny_data), "knn.figures=false"]
    assert knn.main(evaluation)["knn.k5.top1"] >= 0
    assert snapshot(last) == before and (out / f"eval-{last.name}" / "knn.json").is_file()
    for inside in (last, last / "eval"):
        message = user_error(knn.main, [*evaluation, f"output_dir={inside}"], capsys)
        assert message.startswith(f"output_dir: '{inside}' is inside the checkpoint folder '{last}'"), message
    assert snapshot(last) == before and not (last / "eval").exists()
    (last / "notes.txt").write_text("mine")  # not the checkpoint's: the resume neither loads nor refuses it
    (last / "eval").mkdir()
    (last / "eval" / LOCK_FILE).write_text("{}")
    resumed = train_ssl.main(pretrain_args(tiny_data, out, **{"resume": "auto", "train.max_steps": 3}))
    assert resumed is None and checkpoint_dirs(out)[-1].name == "step_00000003"


def test_run_folder_without_config_says_so(two_checkpoints: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Old code: 'data.root must be set'."""
    out = copy_run(two_checkpoints, tmp_path)
    (out / "config.yaml").unlink()
    message = user_error(train_ssl.main, [f"output_dir={out}", "resume=auto"], capsys)
    assert f"{out} has checkpoints but no config.yaml" in message, message
    message = user_error(knn.main, ["--checkpoint", str(checkpoint_dirs(out)[-1])], capsys)
    assert f"'{out}' has no config.yaml" in message and "--dataset" in message, message


# ---- item 14: no space left during a checkpoint write -------------------------------------------------------

def test_file_size_limit_during_a_checkpoint_write_loses_nothing(two_checkpoints: Path, tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    """A real process under `ulimit -f`: one error line naming the limit and the newest complete checkpoint; no
    partial folder; that checkpoint still resumes. Old code: a SafetensorError traceback, exit 1."""
    out = copy_run(two_checkpoints, tmp_path)
    last = checkpoint_dirs(out)[-1]
    limit_kib = (last / "model.safetensors").stat().st_size // 2048  # half of the model file
    args = pretrain_args(tiny_data, out, **{"resume": "auto", "train.max_steps": 3})
    message = one_error(run(command(["train_ssl.py", *args]), f"ulimit -f {limit_kib}; "))
    assert f"file-size limit of {limit_kib * 1024} bytes" in message, message
    assert f"nothing was lost: the newest complete checkpoint is {last}" in message, message
    assert checkpoint_dirs(out)[-1] == last and not list((out / "checkpoints").glob(".tmp-*"))
    assert train_ssl.main(args) is None and checkpoint_dirs(out)[-1].name == "step_00000003"


def test_no_space_left_during_a_checkpoint_write(two_checkpoints: Path, tiny_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_run(two_checkpoints, tmp_path)
    last = checkpoint_dirs(out)[-1]

    def full_disk(self, folder: str) -> None:
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.Accelerator, "save_state", full_disk)
    message = user_error(train_ssl.main, pretrain_args(tiny_data, out, **{"resume": "auto", "train.max_steps": 3}),
                         capsys)
    assert "no space left on device" in message and f"newest complete checkpoint is {last}" in message, message
    assert checkpoint_dirs(out)[-1] == last and not list((out / "checkpoints").glob(".tmp-*"))


# ---- item 15: repeated Ctrl-C -------------------------------------------------------------------------------

def test_ctrl_c_after_the_clean_stop_is_ignored() -> None:
    """Old code: the default handler came back, so a second Ctrl-C during the exit raised KeyboardInterrupt
    in torch's atexit handlers (a traceback after our clean stop)."""
    try:
        with pytest.raises(Interrupted), StopSignals(1):
            raise Interrupted(signal.SIGINT, 3, Path("ckpt"), "resume")
        os.kill(os.getpid(), signal.SIGINT)  # raises KeyboardInterrupt unless ignored
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
