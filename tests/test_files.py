"""sslfg.files (atomic writes) and sslfg.distributed (rank and world size outside a process group)."""

import json

import pytest

from sslfg.distributed import is_main_process, rank_and_world, world_size
from sslfg.files import atomic_path, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_write_json_creates_folders_and_replaces(tmp_path):
    path = tmp_path / "deep" / "x.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 2, "p": str(tmp_path)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_rank_and_world_come_from_the_launcher_before_a_group_exists(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world() == (1, 2) and world_size() == 2 and not is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_and_world() == (0, 1) and is_main_process()
