"""bench/gpu_check.sh: refuses to run without a GPU in one line, and its --dry-run runs every stage at toy
size on the CPU and writes the report (issue 15 item 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ("LoDisc / MoCo v3 step", "GLSim step", "kNN, exact", "Momentum pass", "Peak memory", "Pretraining smoke run")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no GPU, even on a GPU machine
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)


def test_without_a_gpu_it_says_so_in_one_line_and_fails(tmp_path: Path) -> None:
    done = run("--out", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()]  # one line
    assert done.stderr.startswith("error: bench/gpu_check.sh needs a CUDA GPU") and "--dry-run" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    done = run("--dry-run", "--out", str(tmp_path / "out"))
    report = tmp_path / "out" / "report.md"
    assert done.returncode == 0, done.stderr + (report.read_text() if report.is_file() else "")
    assert done.stdout.strip() == f"report: {report}"
    text = report.read_text()
    assert "FAILED" not in text
    for stage in STAGES:
        assert f"## {stage}" in text
    assert text.count("| MoCo v3 |") >= 1 and "| sslfg torch |" in text
    assert (tmp_path / "out" / "smoke" / "backbone.safetensors").is_file()  # the smoke run finished and exported
