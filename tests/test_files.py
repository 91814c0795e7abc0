"""sslfg.files (atomic writes) and sslfg.distributed (rank and world size outside a process group)."""

import json
import os
import threading

import pytest

from sslfg.distributed import is_main_process, rank_and_world, world_size
from sslfg.files import atomic_path, read_utf8, write_json, write_text


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


def test_a_device_or_pipe_is_written_in_place_and_a_link_is_kept(tmp_path):
    """Old code: `--output /dev/null` renamed its temporary file onto /dev/null, replacing the device with a
    regular file for every later process on the machine (found when the next test read YAML from it). A device
    or pipe (here a fifo: the test must not touch the real /dev/null) is now written in place, and a symbolic link
    stays a link: its target gets the new file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    write_json(fifo, {"a": 1})
    reader.join(10)
    assert got == ['{\n  "a": 1\n}'] and fifo.is_fifo()
    target = write_text(tmp_path / "real.json", "old")
    (tmp_path / "link.json").symlink_to(target.name)
    write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe", "real.json"]


def test_rank_and_world_come_from_the_launcher_before_a_group_exists(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_and_world() == (1, 2) and world_size() == 2 and not is_main_process()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert rank_and_world() == (0, 1) and is_main_process()


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_text_is_named_so_with_its_conversion(encoding, tmp_path):
    """Old code: 'byte 0 is 0xff', then advice to convert from Latin-1, which garbles UTF-16."""
    path = tmp_path / "train.csv"
    path.write_bytes("\ufeffclass_id,dir\n".encode(encoding))  # what Windows editors save as "Unicode"
    with pytest.raises(ValueError) as info:
        read_utf8(path, ValueError, "latin-1 advice for {path}")
    assert str(info.value) == (f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; convert "
                               f"it, e.g. iconv -f utf-16 -t utf-8 {path} > utf8.txt, then replace the file with "
                               "utf8.txt.")
