"""Installable as a library (issue 23 §6): a wheel built from the sources installs into a fresh venv and its
console commands run from another directory, without the repository checkout on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "sslfg")  # what setuptools builds the wheel from


def run(*args: object, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_wheel_installs_into_a_fresh_venv_and_runs_from_elsewhere(tmp_path: Path) -> None:
    # a copy of the sources: building in the checkout would leave build/ and egg-info in it
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on the path
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src,
        cwd=tmp_path, env=env)
    wheel = next((tmp_path / "dist").glob("sslfg-*.whl"))

    # a fresh venv that sees this environment's packages (torch ...) through a .pth file, not a copy of them
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path,
                       env=env).stdout.strip())
    (purelib / "dev_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel, cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "usage: sslfg-pretrain" in run(venv / "bin" / "sslfg-pretrain", "--help", cwd=elsewhere, env=env).stdout
    where = run(python, "-c", "import sslfg; print(sslfg.__file__)", cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(purelib)  # the wheel's copy, not the checkout's


def test_the_library_pins_are_ranges_and_make_keeps_the_exact_versions() -> None:
    """pyproject.toml's dependencies admit other versions; requirements/constraints.txt pins each of them and of the
    extras exactly, within its range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    lines = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    exact = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    for name, requirement in ranges.items():
        assert not any(spec.operator == "==" for spec in requirement.specifier), requirement
        assert requirement.specifier.contains(exact[name]), (requirement, exact[name])
    extras = {Requirement(r).name.lower() for extra in project["optional-dependencies"].values() for r in extra}
    assert extras <= exact.keys()
    assert exact["torch"] == "2.14.1" and exact["torchvision"] == "0.29.1"
