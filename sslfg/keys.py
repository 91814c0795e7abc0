"""Every key of a config schema with its type, default, allowed range and meaning, read from the dataclass
declarations, for a command's `--help-keys`. A key's meaning is the comment on its declaration's lines and the
comment lines right above it; its range is the interval it declares with `sslfg.config.bounded`."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from collections.abc import Iterator
from typing import Any, Literal

from sslfg.config import to_dict

WIDTH = 100  # of a meaning's lines


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, as a recipe or an override names it
    type: str
    default: Any
    range: str  # "" for a key without one
    meaning: str


def key_docs(schema: type, prefix: str = "") -> Iterator[KeyDoc]:
    """The leaf keys of the dataclass `schema` in declaration order, each section's keys after its name."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        section = next((sub for sub in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(sub)), None)
        if section is not None:
            yield from key_docs(section, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        intervals = f.metadata.get("range", ())
        yield KeyDoc(prefix + f.name, _type_name(tp), to_dict(default), ", ".join(i.text for i in intervals),
                     _meaning(schema, f.name))


def format_keys(schema: type) -> str:
    """The `--help-keys` text: per key a line `key (type) = default, range` and its meaning indented below."""
    lines = []
    for doc in key_docs(schema):
        bound = f", range {doc.range}" if doc.range else ""
        lines.append(f"{doc.key} ({doc.type}) = {doc.default!r}{bound}")
        lines += textwrap.wrap(doc.meaning or "(undocumented)", WIDTH, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _meaning(schema: type, name: str) -> str:
    """The comment of field `name` where it is declared: in `schema` or a dataclass it inherits from."""
    for cls in schema.__mro__:  # a field redeclared without a comment keeps the one it overrides
        comments = _declaration_comments(cls.__module__).get((cls.__qualname__.rpartition(".")[2], name))
        if comments:
            return comments
    return ""


@functools.cache
def _declaration_comments(module: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comments of each annotated class attribute of `module`'s source: the
    whole-line comments right above it, then those at the end of its lines."""
    try:
        source = inspect.getsource(sys.modules[module])
    except (KeyError, OSError, TypeError):  # a class made at run time, or a built-in
        return {}
    above: dict[int, str] = {}
    beside: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            (above if token.line.lstrip().startswith("#") else beside)[token.start[0]] = text
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                first = stmt.lineno
                while first - 1 in above:
                    first -= 1
                parts = [above[n] for n in range(first, stmt.lineno)]
                parts += [beside[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in beside]
                found[(node.name, stmt.target.id)] = " ".join(parts)
    return found
