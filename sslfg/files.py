"""Writing files so that a reader (a resumed run, a study's report, another process) never sees half of one."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; renamed onto `path` when the block ends, removed if it
    raises. The name carries the process id, so two processes never write the same temporary file.

    A device or pipe (`--output /dev/null`, /dev/stdout, a fifo) is `path` itself: a rename would replace the
    device node with a regular file. A symbolic link is followed, so the link stays and its target is replaced."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        yield path
        return
    path = path.resolve() if path.is_symlink() else path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Writes `text` (UTF-8) atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Writes `data` as indented JSON atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=2, default=str))


def read_utf8(path: str | Path, error: type[Exception], fix: str) -> str:
    """The text of the file at `path` (a UTF-8 byte-order mark dropped); `error` naming the line and byte
    if it is not UTF-8, followed by `fix` ({path} in it is the file), or saying it is UTF-16 and how to convert it."""
    raw = Path(path).read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Windows editors' "Unicode": not Latin-1
        raise error(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; convert it, e.g. "
                    f"iconv -f utf-16 -t utf-8 {path} > utf8.txt, then replace the file with utf8.txt.")
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = bom + err.start
        line = raw.count(b"\n", 0, at) + 1
        text = raw.split(b"\n")[line - 1].decode("utf-8", errors="replace").rstrip("\r")[:80]
        raise error(f"{path} is not UTF-8 text: line {line}, byte {at} is 0x{raw[at]:02x} ({text!r}). "
                    + fix.format(path=path)) from None
