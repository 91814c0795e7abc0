"""Typed configuration: YAML recipes with `_base_` inheritance and dotted `key=value` overrides, loaded
into the dataclass schema of `sslfg.schema`. Unknown keys, wrong types, numbers outside the range a
field declares (`bounded`) and keys that contradict each other (a class's `relations`) are errors
naming the key, the value and the file or command line that set it; a key the schema lists in its
`moved_keys` (where an earlier recipe had it) is an error naming its new place."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from sslfg.files import read_utf8, write_text

T = TypeVar("T")
COMMAND_LINE = "command line"  # the source (`key_sources`) of a key=value override
_SOURCES = "_sslfg_key_sources"  # attribute of a loaded config: its `key_sources`
_BOOL, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_SCALARS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
_DEFAULT = "the schema default"
_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
# the ranges most schema fields use (`bounded`); RATE: dropout, smoothing, momentum, betas: 1 would stop learning
AT_LEAST_1, NON_NEGATIVE, POSITIVE = "[1, inf)", "[0, inf)", "(0, inf)"
PROBABILITY, RATE = "[0, 1]", "[0, 1)"
SEED = "[0, 4294967295]"  # numpy seeds its generators with 32 bits
IMAGE_SIDE = "[1, 4096]"  # pixels: 4096 px is 65,536 patches of 16 px, past any ViT recipe


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and where it was set."""


@dataclasses.dataclass(frozen=True)
class Interval:
    """The allowed values of a number, in interval notation: '[1, inf)', '(0, 1]'. NaN and ±inf are never
    inside (an open infinite end means "any finite number")."""

    text: str

    def __post_init__(self) -> None:
        if not _INTERVAL.match(self.text):
            raise TypeError(f"{self.text!r} is not an interval like '[0, 1)' or '(0, inf)'")

    def parts(self) -> tuple[str, float, float, str]:
        left, lo, hi, right = _INTERVAL.match(self.text).groups()
        return left, float(lo), float(hi), right

    def contains(self, value: float) -> bool:
        left, lo, hi, right = self.parts()
        above = lo < value if left == "(" else lo <= value
        below = value < hi if right == ")" else value <= hi
        return above and below and math.isfinite(value)

    def describe(self, integer: bool) -> str:
        """'an integer ≥ 1', 'a number > 0', 'a number in (0, 1]'."""
        left, lo, hi, _ = self.parts()
        what = "an integer" if integer else "a number"
        if hi < math.inf:
            return f"{what} in {self.text}"
        return f"{what} {'>' if left == '(' else '≥'} {lo:g}" if lo > -math.inf else f"a finite {what[2:]}"


def bounded(interval: str | tuple[str, ...], default: Any = dataclasses.MISSING, *,
            factory: Callable[[], Any] | None = None, ordered: bool = False) -> Any:
    """A schema field whose number (or each item of its tuple or list) must lie in `interval`; a tuple of
    intervals gives one per item. `ordered`: the items must not decrease (a (min, max) pair)."""
    intervals = tuple(map(Interval, (interval,) if isinstance(interval, str) else interval))
    metadata = {"range": intervals, "ordered": ordered}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Relation:
    """What must hold between keys of one schema class (dotted, relative to it), listed in the class's
    `relations`. `rule` says it with {0}, {1}, ... for 'key = value' of each key; `fix(*values)` says what
    to change."""

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    rule: str
    fix: Callable[..., str]


class _KeyError(yaml.YAMLError):
    """A mapping key YAML would read without a word but not as meant (`_check_keys`); `_read` adds the file."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: only true/false are booleans (`mixed_precision: no` stays the
    string 'no') and `1e-4` is a float, not a string; a key set twice in one mapping, or a flow-mapping key
    glued to its value (`{depth:3}`), is an error (`_check_keys`) instead of a silently lost value."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_keys(node, "", set())
        return self.construct_document(node)


def _check_keys(node: yaml.Node, prefix: str, seen: set[int]) -> None:
    """_KeyError for the first key of a mapping under `node` that appears twice in it (PyYAML keeps the last),
    or that is a plain `a:b` with no value inside a flow mapping: `{depth:3}` is the key 'depth:3' set to null
    (which timm, for one, drops silently), not depth 3."""
    if id(node) in seen:  # an alias of a node already checked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_keys(item, prefix, seen)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        name = str(key_node.value)
        dotted, line = prefix + name, key_node.start_mark.line + 1
        if name in lines and key_node.tag != "tag:yaml.org,2002:merge":
            raise _KeyError(dotted, f"set twice, on lines {lines[name]} and {line}, and YAML would silently keep "
                                    f"only the last; remove one of them")
        lines[name] = line
        if node.flow_style and key_node.style is None and ":" in name and value_node.value == "" \
                and value_node.tag.endswith(":null"):
            spelt = "{" + name.replace(":", ": ", 1) + "}"
            raise _KeyError(dotted, f"inside {{...}} a colon needs a space after it, or '{name}' is one key without "
                                    f"a value; write {spelt}")
        _check_keys(value_node, dotted + ".", seen)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings `_Loader` would read as floats (e.g. '1e5')."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_FLOAT, _EXP_FLOAT, list("-+0123456789"))
_Dumper.add_implicit_resolver(_FLOAT, _EXP_FLOAT, list("-+0123456789"))


def load_config(
    path: str | Path | Sequence[str | Path] | None, overrides: Sequence[str], schema: type[T]
) -> T:
    """Schema defaults, then the YAML file(s) at `path` in order (each after its `_base_` files),
    then `overrides`."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> the file (or CLI) that set it last
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    for item in paths:
        _read(Path(item), [], data, sources)
    for item in overrides:
        _merge(data, _parse_override(item), COMMAND_LINE, sources)
    cfg = _Converter(schema, sources).build(schema, data, "")
    leaves = set(_keys(schema, "", leaves_only=True))
    object.__setattr__(cfg, _SOURCES, {key: src for key, src in sources.items() if key in leaves})
    return cfg


def key_sources(cfg: Any) -> dict[str, str]:
    """Dotted key -> the file or "command line" that set it, for a config made by `load_config`; a key
    that is absent kept its schema default. Empty for a config built any other way (e.g. `dataclasses.replace`)."""
    return dict(getattr(cfg, _SOURCES, {}))


def _read(path: Path, chain: list[Path], data: dict[str, Any], sources: dict[str, str]) -> None:
    """Merge the file at `path` into `data`, its `_base_` files first; `chain` holds the including files."""
    name = os.path.normpath(path)
    if path.resolve() in [p.resolve() for p in chain]:
        raise ConfigError("`_base_` cycle: " + " -> ".join(os.path.normpath(p) for p in [*chain, path]))
    where = f" (a `_base_` of {os.path.normpath(chain[-1])})" if chain else ""
    try:
        raw = yaml.load(read_utf8(path, ConfigError, f"A recipe{where} must be UTF-8 YAML text: give a .yaml recipe, "
                                  f"or convert this one, e.g. from Latin-1: iconv -f latin1 -t utf-8 {{path}} > "
                                  f"utf8.yaml, then replace the file with utf8.yaml."), Loader=_Loader)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {name}{where}: {exc.strerror}") from None
    except _KeyError as exc:
        raise ConfigError(f"{exc.key}: {exc.problem} (in {name}{where})") from None
    except yaml.reader.ReaderError as exc:  # UTF-8, but with control characters: a binary file, most likely
        raise ConfigError(f"{name}{where} is not YAML text: character 0x{exc.character:02x} at character "
                          f"{exc.position} is not allowed in YAML; give a .yaml recipe") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {name}: {_yaml_problem(exc)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: the top level must be a mapping of keys, got {_describe(raw)}")
    bases = raw.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"_base_: expected a path or a list of paths, got {_describe(bases)} (in {name})")
    for base in bases:
        _read(path.parent / base, [*chain, path], data, sources)
    try:
        _merge(data, raw, name, sources)
    except RecursionError:  # an alias inside its own anchor (`a: &x {b: *x}`): a structure without end
        raise ConfigError(f"{name}{where}: a YAML alias refers to the mapping it is in (an endless structure); "
                          "write the keys out") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (line, column), then its context, without the quoted
    source lines (the error machinery prints one `error:` line)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    parts = [(exc.problem, exc.problem_mark), (exc.context, exc.context_mark)]
    return "; ".join(f"{text} at line {mark.line + 1}, column {mark.column + 1}" if mark else text
                     for text, mark in parts if text)


def _merge(dst: dict[str, Any], src: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    """Deep-merge `src` into `dst` (mappings update, other values replace), noting each key's source. Keys set
    inside a key that an earlier source gave another value (`train: null`) are a ConfigError naming that
    source: the value is not silently replaced by the mapping, and the keys it would have held are not lost."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key in dst and not isinstance(dst[key], dict):
            raise ConfigError(f"{dotted}: expected a mapping of keys, got {_describe(dst[key])} (in "
                              f"{sources.get(dotted, _DEFAULT)}) but keys inside it are set (in {source}); give "
                              f"{dotted} as a mapping there, or drop that line")
        sources[dotted] = source
        if not isinstance(value, dict):
            dst[key] = value
            continue
        dst.setdefault(key, {})
        _merge(dst[key], value, source, sources, dotted + ".")


def _parse_override(item: str) -> dict[str, Any]:
    """`a.b=value` -> {'a': {'b': value}}, the value parsed as YAML ('' when empty)."""
    key, sep, text = item.partition("=")
    if not sep or not all(key.split(".")):
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.epochs=10 (in {COMMAND_LINE})")
    try:
        value = yaml.load(text, Loader=_Loader) if text else ""
    except _KeyError as exc:
        raise ConfigError(f"{key}.{exc.key}: {exc.problem} (in {COMMAND_LINE})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {text!r} as YAML (in {COMMAND_LINE}): {_yaml_problem(exc)}") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


class _Converter:
    """Builds the typed dataclass tree from merged plain data."""

    def __init__(self, schema: type, sources: dict[str, str]) -> None:
        self.sources = sources
        self.keys = list(_keys(schema, ""))
        self.moved: dict[str, str] = getattr(schema, "moved_keys", {})  # old dotted key -> where it lives now

    def error(self, key: str, message: str, hint: str = "") -> ConfigError:
        path = key.split("[")[0]
        while path and path not in self.sources:
            path = path.rpartition(".")[0]
        return ConfigError(f"{message} (in {self.sources[path]}){hint}" if path else message + hint)

    def check_range(self, key: str, f: dataclasses.Field[Any], raw: Any, value: Any) -> None:
        """ConfigError when the number `value` (or an item of it) is outside the range `f` declares."""
        intervals = f.metadata.get("range")
        if intervals is None:
            return
        items, raws = (value, raw) if isinstance(value, list | tuple) else ((value,), (raw,))
        for i, (item, shown) in enumerate(zip(items, raws, strict=True)):
            interval = intervals[min(i, len(intervals) - 1)]
            if not interval.contains(item):
                where = f"{key}[{i}]" if items is value else key
                raise self.error(key, f"{where}: expected {interval.describe(isinstance(item, int))}, got {shown!r}")
        if f.metadata["ordered"] and list(items) != sorted(items):
            raise self.error(key, f"{key}: expected lower ≤ upper, got {raw!r}")

    def check_relations(self, cls: type, cfg: Any, prefix: str) -> None:
        """ConfigError naming every key of the first of `cls.relations` that `cfg` breaks, and their sources."""
        for relation in getattr(cls, "relations", ()):
            values = [_get(cfg, key) for key in relation.keys]
            if relation.holds(*values):
                continue
            keys = [prefix + key for key in relation.keys]
            statement = relation.rule.format(*(f"{key} = {value!r}" for key, value in zip(keys, values, strict=True)))
            sources = ", ".join(f"{key} in {self.sources.get(key, _DEFAULT)}" for key in keys)
            raise ConfigError(f"{statement} ({sources}); {relation.fix(*values)}")

    def unknown(self, key: str, prefix: str, names: list[str]) -> ConfigError:
        if key in self.moved:
            return self.error(key, f"'{key}' has moved: use {self.moved[key]}")
        candidates = [k for k in self.keys if not prefix.startswith(k + ".")]  # never the section itself
        close = _closest(key, candidates)
        if close:
            return self.error(key, f"unknown key '{key}'", f"; did you mean '{close}'?")
        section = f" in '{prefix[:-1]}'" if prefix else ""
        return self.error(key, f"unknown key '{key}'", f"; valid keys{section}: {', '.join(names)}")

    def mismatch(self, key: str, tp: Any, value: Any) -> ConfigError:
        return self.error(key, f"{key}: expected {_name(tp)}, got {_describe(value)}")

    def build(self, cls: type, data: dict[str, Any], prefix: str, base: Any = None) -> Any:
        """An instance of dataclass `cls` from `data`; unset fields come from `base` or the defaults."""
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        for name in data:
            if name not in names:
                raise self.unknown(f"{prefix}{name}", prefix, names)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields:
            key, tp = prefix + f.name, hints[f.name]
            default = getattr(base, f.name) if base is not None else _default(f)
            if f.name in data:
                values[f.name] = self.convert(data[f.name], tp, key, default)
                self.check_range(key, f, data[f.name], values[f.name])
            elif default is dataclasses.MISSING:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"missing required key '{key}': set it in the config or as {key}=VALUE")
                values[f.name] = self.build(tp, {}, key + ".")
        cfg = dataclasses.replace(base, **values) if base is not None else cls(**values)
        self.check_relations(cls, cfg, prefix)
        return cfg

    def convert(self, value: Any, tp: Any, key: str, default: Any = None) -> Any:
        """`value` checked against (and converted to) type `tp`."""
        origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.mismatch(key, tp, value)
            return self.build(tp, value, key + ".", default if isinstance(default, tp) else None)
        if origin in (typing.Union, types.UnionType):
            options = [arg for arg in args if arg is not type(None)]
            if value is None and type(None) in args:
                return None
            if len(options) == 1:
                return self.convert(value, options[0], key, default)
            for option in options:
                with contextlib.suppress(ConfigError):
                    return self.convert(value, option, key, default)
            raise self.mismatch(key, tp, value)
        if origin is Literal:
            if any(value == arg and type(value) is type(arg) for arg in args):
                return value
            options = ", ".join(map(repr, args))
            raise self.error(key, f"{key}: expected one of {options}, got {_describe(value)}")
        if origin in (list, tuple):
            if not isinstance(value, list | tuple):
                raise self.mismatch(key, tp, value)
            item_types = (args[0] if args else Any,) * len(value)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    message = f"{key}: expected {len(args)} items ({_name(tp)}), got {len(value)}"
                    raise self.error(key, message)
                item_types = args
            items = zip(value, item_types, strict=True)
            return origin(self.convert(item, t, f"{key}[{i}]") for i, (item, t) in enumerate(items))
        if origin is dict:
            if not isinstance(value, dict):
                raise self.mismatch(key, tp, value)
            return value
        if tp in _SCALARS:
            if isinstance(value, _SCALARS[tp]) and (tp is bool or not isinstance(value, bool)):
                return tp(value)
            raise self.mismatch(key, tp, value)
        raise TypeError(f"{key}: type {tp!r} is not supported by sslfg.config")


def _closest(key: str, candidates: list[str]) -> str | None:
    """The valid key the unknown dotted `key` most likely meant, in any section: one whose last component is (or
    is close to) `key`'s (`train.seed` -> `seed`), the nearest to the whole key among several; else the
    closest whole key; None if nothing is close."""
    last = key.rpartition(".")[2]
    tails = difflib.get_close_matches(last, sorted({c.rpartition(".")[2] for c in candidates}), n=1)
    pool = [c for c in candidates if c.rpartition(".")[2] == tails[0]] if tails else \
        difflib.get_close_matches(key, candidates, n=1)
    return max(pool, key=lambda c: difflib.SequenceMatcher(None, key, c).ratio(), default=None)


def _keys(cls: type, prefix: str, leaves_only: bool = False) -> Iterator[str]:
    """Every valid dotted key of dataclass `cls` (with `leaves_only`, not the sections themselves)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sections = [sub for sub in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(sub)]
        if not (sections and leaves_only):
            yield prefix + f.name
        for sub in sections:
            yield from _keys(sub, f"{prefix}{f.name}.", leaves_only)


def _get(cfg: Any, key: str) -> Any:
    """The value of dotted `key` in the dataclass tree `cfg`."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_warmup(cfg: Any, key: str, total_steps: int) -> None:
    """ConfigError when the warmup `key` of a config made by `load_config` lasts the whole run of `total_steps`
    optimizer steps (known only once the dataset is read): the lr would never reach its peak nor decay."""
    warmup = _get(cfg, key)
    if warmup < total_steps:
        return
    raise ConfigError(
        f"{key}: {warmup} warmup steps are not fewer than the run's {total_steps} optimizer steps, so the lr would "
        f"never leave warmup (in {key_sources(cfg).get(key, _DEFAULT)}); set {key} below {total_steps} "
        f"(e.g. {total_steps // 10}) or train more epochs"
    )


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    kind = {dict: "mapping", list: "list", type(None): "null"}.get(type(value), type(value).__name__)
    return kind if value is None else f"{kind} {reprlib.repr(value)}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """`cfg` (a dataclass) as nested plain dicts and lists, ready for YAML or JSON."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def save_config(cfg: Any, path: str | Path) -> None:
    """Write `cfg` as YAML, atomically; `load_config(path, [], type(cfg))` gives it back."""
    write_text(path, yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=None,
                               allow_unicode=True))

