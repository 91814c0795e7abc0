"""Trackers (issue 16 item 4): `train.log_with` sends the logged scalars and the resolved config, flattened, to
Accelerate's trackers; wandb is tested for real in its offline mode (no network), reading back the run file it
writes; a tracker whose package is missing is one error line naming what to install."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import yaml
from accelerate.tracking import get_available_trackers
from wandb.proto import wandb_internal_pb2

from sslfg.cli import run_cli
from sslfg.commands import pretrain as train_ssl
from sslfg.config import load_config
from sslfg.engine.metrics import flat_config
from sslfg.schema import PretrainConfig
from tests.conftest import write_csv_dataset
from tests.reliability.procs import pretrain_args

BLOCK, HEADER = 32768, 7  # the LevelDB log layout of a .wandb file: 32 KiB blocks, 7-byte headers
FULL, LAST = 1, 4


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline wandb run file: after the 7-byte file header, each record is one
    chunk (FULL) or several (FIRST, MIDDLE, LAST), each behind a (crc, length, type) header; a block's
    tail shorter than a header is padding."""
    data, pos, chunk, records = path.read_bytes(), HEADER, b"", []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_flat_config_is_dotted_scalars() -> None:
    cfg = load_config(None, ["model.kwargs={depth: 2}", "train.betas=[0.9, 0.95]"], PretrainConfig)
    flat = flat_config(cfg)
    assert flat["train.base_lr"] == cfg.train.base_lr and flat["model.name"] == cfg.model.name
    assert flat["model.kwargs.depth"] == 2 and flat["train.betas"] == "[0.9, 0.95]"
    assert flat["train.log_with"] == '["tensorboard"]'
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())


def test_wandb_offline_gets_the_scalars_and_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_csv_dataset(tmp_path / "data")
    run = tmp_path / "run"
    train_ssl.main([*pretrain_args(data, run), "train.max_steps=2", "train.log_with=[tensorboard, wandb]"])

    # the config reaches the file as config records, or inside the run record when it is written after them; wandb's
    # service process may still be writing the file when finish() returns on a loaded machine (seen once: a CI run
    # beside 3 trainings on 2 cores)
    for _ in range(120):
        records = wandb_records(next(run.glob("wandb/offline-run-*/run-*.wandb")))
        updates = [item for r in records for item in (r.config.update if r.HasField("config") else
                                                      r.run.config.update if r.HasField("run") else [])]
        config = {item.key: json.loads(item.value_json) for item in updates}
        if "output_dir" in config and any(r.HasField("history") for r in records):
            break
        time.sleep(0.5)
    resolved = load_config(run / "config.yaml", [], PretrainConfig)
    expected = flat_config(resolved)
    assert {k: config[k] for k in expected} == json.loads(json.dumps(expected))
    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [m["step"] for m in logged] == [1, 2]
    for h, m in zip(history, logged, strict=True):
        assert h["loss"] == pytest.approx(m["loss"]) and h["lr"] == pytest.approx(m["lr"])
    # TensorBoard, the default, gets the same hyper-parameters
    (hparams,) = run.glob("tensorboard/*/hparams.yml")
    assert yaml.safe_load(hparams.read_text()) == expected


def test_missing_tracker_package_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in ("mlflow", "aim", "comet_ml") if name not in available]
    assert missing, "every optional tracker is installed here: nothing to provoke"
    data = write_csv_dataset(tmp_path / "data")
    argv = [*pretrain_args(data, tmp_path / "run"), "train.max_steps=1", f"train.log_with=[{missing[0]}]"]
    assert run_cli(train_ssl.main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: train.log_with: the {missing[0]} tracker needs the {missing[0]} package, which is not "
                     f"installed; install it with `pip install {missing[0]}`, or remove {missing[0]} from "
                     "train.log_with"]
