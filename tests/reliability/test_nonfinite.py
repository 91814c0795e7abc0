"""Case 5: a non-finite loss stops the run, names the step, leaves the last checkpoint intact, and the
run continues from it with a lower lr; through the command line the user gets one `error:` line and
exit code 2. For pretraining and fine-tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sslfg import finetune as finetune_module
from sslfg.cli import run_cli
from sslfg.commands import finetune as finetune_cli
from sslfg.commands import pretrain as train_ssl
from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.engine.loop import NonFiniteLossError
from sslfg.methods import MoCoV3
from sslfg.pretrain import pretrain
from tests.conftest import tiny_config
from tests.reliability.procs import finetune_args, pretrain_args

POISONED_CALL = 4  # the 4th step diverges (step 4, as metrics.jsonl and checkpoints count); checkpoints every 2


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the newest checkpoint, by name."""
    ckpt = checkpoint_dirs(run)[-1]
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(ckpt.rglob("*")) if p.is_file()}


def poison_pretraining(monkeypatch: pytest.MonkeyPatch, run: Path, seen: dict, call: int = POISONED_CALL) -> list:
    """LoDisc's loss becomes NaN at call `call`; the checkpoint as it is then goes into `seen`. Returns the
    list that gets one item per forward."""
    forward, calls = MoCoV3.forward, []

    def poisoned(self: MoCoV3, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        out = forward(self, x1, x2)
        calls.append(1)
        if len(calls) == call:
            seen.update(snapshot(run))
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MoCoV3, "forward", poisoned)
    return calls


def poison_finetuning(monkeypatch: pytest.MonkeyPatch, run: Path, seen: dict) -> None:
    """The classification loss becomes +inf at the 4th call."""
    loss, calls = finetune_module.classification_loss, []

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        out = loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == POISONED_CALL:
            seen.update(snapshot(run))
            out = out * float("inf")
        return out

    monkeypatch.setattr(finetune_module, "classification_loss", poisoned)


def test_nan_loss_stops_and_last_checkpoint_resumes(tiny_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run, seen = tmp_path / "run", {}
    poison_pretraining(monkeypatch, run, seen)
    cfg = tiny_config(tiny_data, run)  # 3 steps an epoch, 6 in all, checkpoints every 2 steps
    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*step_00000002.*resume=auto") as info:
        pretrain(cfg)
    assert "nan" in str(info.value)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in logged)
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    assert snapshot(run) == seen, "the failing step touched the last good checkpoint"

    monkeypatch.undo()
    cfg.resume, cfg.train.base_lr = "auto", cfg.train.base_lr / 10
    pretrain(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[2]["lr"] < records[1]["lr"] / 5  # the lower lr took effect from the resumed step


def test_deferred_check_names_the_first_bad_step_and_writes_no_checkpoint_after_it(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop reads the loss back only at log and checkpoint steps (no host sync per step): with
    log_every 5, the NaN of step 3 is found at the checkpoint of step 4, after step 4 ran, and the error
    still names step 3 and the checkpoint of step 2, untouched; no metrics record from step 3 on."""
    run, seen = tmp_path / "run", {}
    calls = poison_pretraining(monkeypatch, run, seen, call=3)  # step 3 diverges
    cfg = tiny_config(tiny_data, run, log_every=5, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"\(nan\) at step 3 .*step_00000002.*resume=auto"):
        pretrain(cfg)
    assert len(calls) == 4, "the step after the bad one runs before the check: no read-back at step 3"
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    assert snapshot(run) == seen, "the steps after the bad one touched the last good checkpoint"
    assert not (run / "metrics.jsonl").read_text().strip(), "a step from the bad one on was logged"


@pytest.mark.parametrize("kind", ["pretraining", "fine-tuning"])
def test_cli_non_finite_loss_is_one_error_line_and_a_lower_lr_continues(
        kind: str, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run, seen = tmp_path / "run", {}
    if kind == "pretraining":
        main, args, lr_key, lr = train_ssl.main, pretrain_args(tiny_data, run), "train.base_lr", 1.5e-5
        poison_pretraining(monkeypatch, run, seen)
    else:
        main, args, lr_key, lr = finetune_cli.main, finetune_args(tiny_data, run), "train.lr", 0.005
        poison_finetuning(monkeypatch, run, seen)
    args += ["train.checkpoint_every=2"]
    capsys.readouterr()
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    message = errors[0]
    assert "non-finite loss" in message and "at step 4 " in message, message
    assert f"{run / 'checkpoints' / 'step_00000002'}" in message and "resume=auto" in message, message
    assert f"lower `{lr_key}`" in message, message  # the key this command reads, not another one's
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    assert snapshot(run) == seen, "the failing step touched the last good checkpoint"

    monkeypatch.undo()
    assert run_cli(main, [*args, "resume=auto", f"{lr_key}={lr}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[2]["lr"] < records[1]["lr"] / 5  # the lower lr took effect from the resumed step
    assert checkpoint_dirs(run)[-1].name == "step_00000006"
