"""A non-finite loss stops the run, names the step, and leaves the last checkpoint resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslfg.engine.checkpoint import checkpoint_dirs
from sslfg.engine.loop import NonFiniteLossError
from sslfg.models.lodisc import LoDisc
from sslfg.pretrain import pretrain
from tests.conftest import tiny_config


def test_nan_loss_stops_and_last_checkpoint_resumes(tiny_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    forward = LoDisc.forward
    calls = []

    def poisoned(self: LoDisc, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        out = forward(self, x1, x2)
        calls.append(1)
        if len(calls) == 4:  # the 4th step (index 3) diverges
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(LoDisc, "forward", poisoned)
    cfg = tiny_config(tiny_data, tmp_path / "run")  # checkpoints every 2 steps
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*step_00000002.*resume=auto") as info:
        pretrain(cfg)
    assert "nan" in str(info.value)
    run = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(run)] == ["step_00000002"]
    weights_before = (checkpoint_dirs(run)[-1] / "model.safetensors").read_bytes()

    monkeypatch.setattr(LoDisc, "forward", forward)
    cfg.resume, cfg.train.base_lr = "auto", cfg.train.base_lr / 10
    pretrain(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[2]["lr"] < records[1]["lr"] / 5  # the lower lr took effect from the resumed step
    assert weights_before  # the checkpoint the resume started from was intact
