from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from sslfg.cli import parse_cli
from sslfg.config import ConfigError, check_warmup, key_sources, load_config, save_config, to_dict
from sslfg.schema import EvalConfig, FinetuneConfig, PretrainConfig, StudyConfig
from sslfg.study.run import Study
from sslfg.weights import create_vit


@dataclass
class Inner:
    ratio: float = 0.5
    mode: Literal["a", "b"] = "a"
    flag: bool = False


@dataclass
class Small:
    name: str = "x"
    count: int = 1
    inner: Inner = field(default_factory=lambda: Inner(ratio=0.25))
    pair: tuple[float, float] = (0.0, 1.0)
    many: tuple[float, ...] = ()
    ids: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    maybe: int | None = None
    anything: Any = None


@dataclass
class NeedsPath:
    path: str
    depth: int = 1


@dataclass
class Outer:
    sub: NeedsPath


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error(path: str | Path | None, overrides: list[str], schema: type = Small) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, schema)
    return str(info.value)


def test_defaults_without_a_file() -> None:
    assert load_config(None, [], PretrainConfig) == PretrainConfig()
    assert load_config(None, [], Small).inner == Inner(ratio=0.25)


def test_deep_merge_through_two_levels_of_base(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", "name: root\ncount: 3\ninner: {ratio: 0.1, mode: b}\nextra: {k: 1, j: 2}\n")
    write(tmp_path / "mid.yaml", "_base_: root.yaml\ninner: {flag: true}\nextra: {j: 5}\n")
    child = write(tmp_path / "child.yaml", "_base_: mid.yaml\ninner:\n  ratio: 0.7\ncount: 4\n")
    cfg = load_config(child, [], Small)
    assert cfg.name == "root" and cfg.count == 4
    assert cfg.inner == Inner(ratio=0.7, mode="b", flag=True)
    assert cfg.extra == {"k": 1, "j": 5}


def test_list_of_bases_merges_in_order_then_the_file(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "name: a\ncount: 1\nmaybe: 1\n")
    write(tmp_path / "b.yaml", "count: 2\nmaybe: 2\n")
    cfg = load_config(write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\nmaybe: 3\n"), [], Small)
    assert (cfg.name, cfg.count, cfg.maybe) == ("a", 2, 3)


def test_base_paths_relative_to_including_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "configs/datasets/cub.yaml", "data: {root: /data/cub, num_classes: 200}\n")
    recipe = write(tmp_path / "configs/pretrain/sub/r.yaml", "_base_: ../../datasets/cub.yaml\nseed: 3\n")
    monkeypatch.chdir(write(tmp_path / "elsewhere/x", "").parent)
    cfg = load_config(recipe, [], PretrainConfig)
    assert (cfg.data.root, cfg.data.num_classes, cfg.seed) == ("/data/cub", 200, 3)


def test_base_cycle_shows_the_chain(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    b = write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    assert f"{a} -> {b} -> {a}" in error(a, [])


def test_shared_base_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "common.yaml", "count: 7\n")
    write(tmp_path / "a.yaml", "_base_: common.yaml\n")
    write(tmp_path / "b.yaml", "_base_: common.yaml\nname: b\n")
    cfg = load_config(write(tmp_path / "top.yaml", "_base_: [a.yaml, b.yaml]\n"), [], Small)
    assert (cfg.count, cfg.name) == (7, "b")


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    assert str(tmp_path / "nope.yaml") in error(tmp_path / "nope.yaml", [])
    child = write(tmp_path / "child.yaml", "_base_: gone.yaml\n")
    message = error(child, [])
    assert str(tmp_path / "gone.yaml") in message and str(child) in message
    assert "top level must be a mapping" in error(write(tmp_path / "list.yaml", "- 1\n- 2\n"), [])
    assert str(tmp_path / "bad.yaml") in error(write(tmp_path / "bad.yaml", "a: [1\n"), [])
    assert "_base_" in error(write(tmp_path / "b.yaml", "_base_: 3\n"), [])


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "e.yaml", ""), [], Small) == Small()


def test_unknown_key_in_yaml_suggests_the_nearest(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "method:\n  local:\n    keep_ratoi: 0.5\n")
    assert error(path, [], PretrainConfig) == (
        f"unknown key 'method.local.keep_ratoi' (in {path}); did you mean 'method.local.keep_ratio'?"
    )


def test_unknown_key_in_override(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "seed: 1\n")
    assert error(path, ["train.epoch=3"], PretrainConfig) == (
        "unknown key 'train.epoch' (in command line); did you mean 'train.epochs'?"
    )
    assert "did you mean 'method.local.keep_ratio'" in error(None, ["keep_ratio=0.5"], PretrainConfig)


def test_unknown_key_without_close_match_lists_the_section() -> None:
    assert error(None, ["inner.zzzzzz=1"]) == (
        "unknown key 'inner.zzzzzz' (in command line); valid keys in 'inner': ratio, mode, flag"
    )


def test_wrong_type_names_key_and_source(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "method: {local: {keep_ratio: abc}}\nseed: 2\n")
    assert error(path, [], PretrainConfig) == f"method.local.keep_ratio: expected float, got str 'abc' (in {path})"
    assert error(path, ["method.local.keep_ratio=0.1", "seed=x"], PretrainConfig) == (
        "seed: expected int, got str 'x' (in command line)"
    )
    assert error(None, ["name=12"]) == "name: expected str, got int 12 (in command line)"
    assert error(None, ["count=1.5"]) == "count: expected int, got float 1.5 (in command line)"
    assert error(None, ["count=true"]) == "count: expected int, got bool True (in command line)"


def test_mapping_for_scalar_and_scalar_for_section() -> None:
    assert error(None, ["count={a: 1}"]).startswith("count: expected int, got mapping")
    assert error(None, ["inner=3"]) == "inner: expected a mapping of keys, got int 3 (in command line)"
    assert error(None, ["extra=3"]).startswith("extra: expected dict[str, Any], got int 3")


def test_keys_inside_a_key_set_to_another_value_are_an_error_naming_both_sources(tmp_path: Path) -> None:
    """Old code: `inner: null` in a recipe, then inner.* on the command line, dropped every inner key the base
    recipe set (silently, as schema defaults); without the override it was an error."""
    write(tmp_path / "base.yaml", "inner: {ratio: 0.75}\n")
    recipe = write(tmp_path / "recipe.yaml", "_base_: base.yaml\ninner: null\n")
    expected = f"inner: expected a mapping of keys, got null (in {recipe})"
    assert error(recipe, []) == expected
    assert error(recipe, ["inner.mode=b"]) == (f"{expected} but keys inside it are set (in command line); give "
                                               "inner as a mapping there, or drop that line")


def test_a_recursive_alias_is_an_error_naming_the_file(tmp_path: Path) -> None:
    recipe = write(tmp_path / "recipe.yaml", "inner: &a\n  b: *a\n")  # old code: RecursionError
    assert error(recipe, []) == (f"{recipe}: a YAML alias refers to the mapping it is in (an endless structure); "
                                 "write the keys out")


def test_literal_lists_the_options() -> None:
    assert error(None, ["train.mixed_precision=fp32"], PretrainConfig) == (
        "train.mixed_precision: expected one of 'no', 'fp16', 'bf16', got str 'fp32' (in command line)"
    )
    assert load_config(None, ["train.mixed_precision=no"], PretrainConfig).train.mixed_precision == "no"


@pytest.mark.parametrize("value", ["1", "0", "yes", "'true'", "on"])
def test_bool_accepts_only_true_and_false(value: str) -> None:
    assert "inner.flag: expected bool" in error(None, [f"inner.flag={value}"])


def test_bool_values() -> None:
    assert load_config(None, ["inner.flag=true"], Small).inner.flag is True
    assert load_config(None, ["inner.flag=False"], Small).inner.flag is False


def test_tuples() -> None:
    cfg = load_config(None, ["pair=[1, 2.5]", "many=[1, 2, 3]"], Small)
    assert cfg.pair == (1.0, 2.5) and isinstance(cfg.pair[0], float)
    assert cfg.many == (1.0, 2.0, 3.0)
    expected = "pair: expected 2 items (tuple[float, float]), got 3 (in command line)"
    assert error(None, ["pair=[1, 2, 3]"]) == expected
    assert error(None, ["many=[1, x]"]) == "many[1]: expected float, got str 'x' (in command line)"
    assert error(None, ["pair=0.5"]).startswith("pair: expected tuple[float, float], got float 0.5")


def test_int_becomes_float_and_exponents_are_floats() -> None:
    cfg = load_config(None, ["train.base_lr=2.5E3", "train.min_lr=1e-4"], PretrainConfig)
    assert (cfg.train.base_lr, cfg.train.min_lr) == (2500.0, 1e-4)
    ratio = load_config(None, ["inner.ratio=1"], Small).inner.ratio
    assert ratio == 1.0 and isinstance(ratio, float)


def test_list_dict_optional_any() -> None:
    cfg = load_config(None, ["ids=[1, 2]", "extra={a: {b: [1]}}", "maybe=4", "anything={x: 1}"], Small)
    assert (cfg.ids, cfg.extra, cfg.maybe, cfg.anything) == ([1, 2], {"a": {"b": [1]}}, 4, {"x": 1})
    assert load_config(None, ["maybe=null"], Small).maybe is None
    assert error(None, ["ids=[1, a]"]) == "ids[1]: expected int, got str 'a' (in command line)"
    assert error(None, ["maybe=x"]) == "maybe: expected int, got str 'x' (in command line)"


def test_override_into_a_dict_field_merges() -> None:
    cfg = load_config(None, ["model.kwargs={embed_dim: 192}", "model.kwargs.depth=4"], PretrainConfig)
    assert cfg.model.kwargs == {"embed_dim": 192, "depth": 4}


def test_unset_fields_keep_the_default_factory_values() -> None:
    cfg = load_config(None, ["inner.mode=b"], Small)
    assert cfg.inner == Inner(ratio=0.25, mode="b")


def test_missing_required_key() -> None:
    assert error(None, [], Outer).startswith("missing required key 'sub.path'")
    assert load_config(None, ["sub.path=/x"], Outer) == Outer(NeedsPath("/x"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("output_dir=runs/a=b", "runs/a=b"),
        ("output_dir=runs/x", "runs/x"),
        ("output_dir=", ""),
        ("output_dir='12'", "12"),
        ("output_dir=no", "no"),
    ],
)
def test_override_strings(override: str, expected: str) -> None:
    assert load_config(None, [override], PretrainConfig).output_dir == expected


def test_override_values_are_yaml() -> None:
    cfg = load_config(None, ["pair=[0.1,0.2]", "inner.flag=true", "maybe=null", "count=7"], Small)
    assert (cfg.pair, cfg.inner.flag, cfg.maybe, cfg.count) == ((0.1, 0.2), True, None, 7)


@pytest.mark.parametrize("override", ["seed", "=3", "model..name=x"])
def test_malformed_override(override: str) -> None:
    assert "must look like key=value" in error(None, [override], PretrainConfig)


def test_overrides_apply_after_the_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "seed: 1\ntrain: {epochs: 5}\n")
    cfg = load_config(path, ["seed=2"], PretrainConfig)
    assert (cfg.seed, cfg.train.epochs) == (2, 5)


def test_to_dict_is_plain() -> None:
    d = to_dict(Small(pair=(1.0, 2.0), many=(3.0,)))
    assert d["pair"] == [1.0, 2.0] and d["many"] == [3.0]
    assert d["inner"] == {"ratio": 0.25, "mode": "a", "flag": False}


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "output_dir=runs/a=b",
            "resume=yes",
            "data.root='1e5'",
            "data.mean=[0.5, 0.25, 0.125]",
            "model.kwargs={depth: 6, dims: [1, 2]}",
            "method.mocov3.use_projector=false",
            "train.base_lr=1.5e-7",
            "train.mixed_precision=no",
        ],
        PretrainConfig,
    )
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    save_config(cfg, path)  # overwrites in place
    assert load_config(path, [], PretrainConfig) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
    text = path.read_text()
    assert text.startswith("output_dir:") and "mean: [0.5, 0.25, 0.125]" in text


def test_parse_cli() -> None:
    assert parse_cli(["--config", "c.yaml", "a=1", "b.c=x=y"], "d") == ("c.yaml", ["a=1", "b.c=x=y"])
    assert parse_cli(["a=1", "--config", "c.yaml", "b=2"], "d") == ("c.yaml", ["a=1", "b=2"])
    assert parse_cli([], "d") == (None, [])


def test_parse_cli_help_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_cli(["-h"], "Pretrain a ViT.")
    out = capsys.readouterr().out
    assert "Pretrain a ViT." in out and re.search(r"example:\n .* --config \S+\.yaml \S+=\S+", out)


def test_several_files_merge_in_order(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("seed: 1\noutput_dir: runs/a\n")
    (tmp_path / "b.yaml").write_text("seed: 2\n")
    cfg = load_config([tmp_path / "a.yaml", tmp_path / "b.yaml"], [], PretrainConfig)
    assert (cfg.seed, cfg.output_dir) == (2, "runs/a")


def test_key_sources_name_the_file_or_command_line_that_set_each_key(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "data: {root: /d, mean: [0.5, 0.5, 0.5]}\nmodel: {kwargs: {depth: 2}}\n")
    recipe = write(tmp_path / "recipe.yaml", "_base_: base.yaml\ndata: {root: /e}\nseed: 3\n")
    cfg = load_config(recipe, ["seed=4", "model.kwargs.embed_dim=32"], PretrainConfig)
    assert key_sources(cfg) == {
        "data.root": str(recipe), "data.mean": str(base), "seed": "command line", "model.kwargs": "command line",
    }  # leaf keys only: no section ('data') and nothing inside a dict value ('model.kwargs.depth')
    assert "data.std" not in key_sources(cfg)  # absent: the schema default
    assert key_sources(load_config(None, [], PretrainConfig)) == {}
    assert key_sources(PretrainConfig()) == {}


SCHEMAS = (PretrainConfig, FinetuneConfig, EvalConfig, StudyConfig)


def numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every field of `cls` (recursively) holding numbers: int, float or a tuple/list of them."""
    found, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            found += numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or set(typing.get_args(tp)) - {Ellipsis} <= {int, float} and typing.get_args(tp):
            found.append((prefix + f.name, f))
    return found


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_numeric_key_declares_its_range(schema: type) -> None:
    keys = numeric_fields(schema)
    assert len(keys) >= 4 and any("." in key for key, _ in keys)  # the walk finds nested sections too
    assert [key for key, f in keys if "range" not in f.metadata] == []


# (override, schema, the message after "<key>: ") for one value just outside each kind of range
OUT_OF_RANGE = [
    ("train.batch_size=0", PretrainConfig, "expected an integer ≥ 1, got 0"),
    ("train.epochs=0", PretrainConfig, "expected an integer ≥ 1, got 0"),
    ("train.grad_accum_steps=0", FinetuneConfig, "expected an integer ≥ 1, got 0"),
    ("train.checkpoint_every=0", PretrainConfig, "expected an integer ≥ 1, got 0"),
    ("train.max_steps=-1", PretrainConfig, "expected an integer ≥ 0, got -1"),
    ("method.local.keep_ratio=0", PretrainConfig, "expected a number in (0, 1], got 0"),
    ("method.local.keep_ratio=1.01", PretrainConfig, "expected a number in (0, 1], got 1.01"),
    ("method.mocov3.temperature=0", PretrainConfig, "expected a number > 0, got 0"),
    ("method.mocov3.temperature=-.inf", PretrainConfig, "expected a number > 0, got -inf"),
    ("method.mocov3.momentum=1", PretrainConfig, "expected a number in [0, 1), got 1"),
    ("train.base_lr=0", PretrainConfig, "expected a number > 0, got 0"),
    ("train.min_lr=-1e-6", PretrainConfig, "expected a number ≥ 0, got -1e-06"),
    ("train.lr=.nan", FinetuneConfig, "expected a number > 0, got nan"),
    ("augment.jitter_p=1.5", PretrainConfig, "expected a number in [0, 1], got 1.5"),
    ("augment.random_erasing=-0.1", FinetuneConfig, "expected a number in [0, 1], got -0.1"),
    ("augment.resize_ratio=0.9", FinetuneConfig, "expected a number ≥ 1, got 0.9"),
    ("data.num_workers=-1", PretrainConfig, "expected an integer ≥ 0, got -1"),
    ("data.image_size=0", EvalConfig, "expected an integer in [1, 4096], got 0"),
    ("data.image_size=100000", PretrainConfig, "expected an integer in [1, 4096], got 100000"),  # timm's traceback
    ("seed=4294967296", PretrainConfig, "expected an integer in [0, 4294967295], got 4294967296"),  # numpy's
    ("model.top_k=0", FinetuneConfig, "expected an integer ≥ 1, got 0"),
    ("model.adapter_width=0", FinetuneConfig, "expected an integer ≥ 1, got 0"),
    ("linear.val_fraction=1", EvalConfig, "expected a number in (0, 1), got 1"),
    ("features.crop_ratio=0", EvalConfig, "expected a number in (0, 1], got 0"),
    ("pretrain.minutes=-5", StudyConfig, "expected a number ≥ 0, got -5"),
]


@pytest.mark.parametrize(("override", "schema", "expected"), OUT_OF_RANGE, ids=[o for o, *_ in OUT_OF_RANGE])
def test_a_number_out_of_its_range_names_key_value_range_and_source(override: str, schema: type,
                                                                      expected: str) -> None:
    key = override.partition("=")[0]
    assert error(None, [override], schema) == f"{key}: {expected} (in command line)"


@pytest.mark.parametrize(("override", "schema", "expected"), [
    ("data.std=[0.2, 0, 0.2]", PretrainConfig, "data.std[1]: expected a number in (0, 1], got 0"),
    ("data.mean=[0.5, 0.5, 128]", EvalConfig, "data.mean[2]: expected a number in [0, 1], got 128"),
    ("knn.ks=[20, 0]", EvalConfig, "knn.ks[1]: expected an integer ≥ 1, got 0"),
    ("linear.lrs=[0.1, -1]", EvalConfig, "linear.lrs[1]: expected a number > 0, got -1"),
    ("augment.jitter=[0.4, 0.4, 0.2, 0.6]", PretrainConfig,
     "augment.jitter[3]: expected a number in [0, 0.5], got 0.6"),
    ("seeds=[0, -1]", StudyConfig, "seeds[1]: expected an integer in [0, 4294967295], got -1"),
])
def test_each_item_of_a_list_or_tuple_is_checked(override: str, schema: type, expected: str) -> None:
    assert error(None, [override], schema) == f"{expected} (in command line)"


def test_every_default_is_in_range_and_consistent(tmp_path: Path) -> None:
    for schema in SCHEMAS:  # every key written out, so every key is checked as if a recipe had set it
        save_config(schema(), tmp_path / "all.yaml")
        assert load_config(tmp_path / "all.yaml", [], schema) == schema()


def test_range_error_names_the_file_that_set_the_value(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "method: {local: {keep_ratio: 0.0}}\n")
    recipe = write(tmp_path / "recipe.yaml", "_base_: base.yaml\nseed: 1\n")
    assert error(recipe, [], PretrainConfig) == (
        f"method.local.keep_ratio: expected a number in (0, 1], got 0.0 (in {base})")
    overridden = load_config(recipe, ["method.local.keep_ratio=0.5"], PretrainConfig)
    assert overridden.method.local.keep_ratio == 0.5  # overridden: fine


@pytest.mark.parametrize(("override", "schema"), [
    ("method.local.keep_ratio=1", PretrainConfig), ("method.mocov3.momentum=0", PretrainConfig),
    ("augment.flip_p=0", PretrainConfig),
    ("augment.flip_p=1", PretrainConfig), ("augment.crop_scale=[0.5, 0.5]", PretrainConfig),
    ("data.num_workers=0", PretrainConfig), ("model.patch_size=0", PretrainConfig),
    ("train.max_steps=0", PretrainConfig),
    ("train.min_lr=0.01", FinetuneConfig), ("augment.resize_ratio=1", FinetuneConfig),
    ("linear.val_fraction=0.5", EvalConfig), ("method.local.weight=0", PretrainConfig),
    ("train.weight_decay_end=-1", PretrainConfig), ("pretrain.epochs=0", StudyConfig),
])
def test_values_on_the_boundary_are_accepted(override: str, schema: type) -> None:
    key, _, text = override.partition("=")
    value = _get(load_config(None, [override], schema), key)
    assert value == yaml.safe_load(text) or list(value) == yaml.safe_load(text)


def _get(cfg: object, key: str) -> object:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize(("overrides", "schema", "named"), [
    (["augment.blur_sigma=[2.0, 0.1]"], PretrainConfig, "augment.blur_sigma: expected lower ≤ upper, got [2.0, 0.1]"),
    (["train.min_lr=0.02", "train.lr=0.01"], FinetuneConfig, "train.min_lr = 0.02 must be at most train.lr = 0.01"),
    (["train.base_lr=1e-4", "train.batch_size=64", "train.min_lr=1e-4"], PretrainConfig,
     "train.min_lr = 0.0001 must be at most the lr of one process"),
    (["train.warmup_epochs=3", "train.epochs=2"], PretrainConfig,
     "train.warmup_epochs = 3.0 must be below train.epochs = 2"),
    (["model.patch_size=5", "data.image_size=28"], FinetuneConfig,
     "model.patch_size = 5 must divide data.image_size = 28"),
    (["pretrain.epochs=10", "pretrain.minutes=30"], StudyConfig, "pretrain.epochs = 10 and pretrain.minutes = 30.0"),
    (["method.local.keep_ratio=0.02", "model.patch_size=4", "data.image_size=28"], PretrainConfig,
     "method.local.keep_ratio = 0.02 keeps no patch"),  # ⌊0.02 · 49⌋ = 0
    (["model.top_k=17", "model.patch_size=8", "data.image_size=32"], FinetuneConfig,
     "model.top_k = 17 must be at most the number of patches"),  # 4 × 4 = 16

])
def test_contradicting_keys_are_an_error_naming_both(overrides: list[str], schema: type, named: str) -> None:
    message = error(None, overrides, schema)
    assert message.startswith(named) and "command line" in message


def test_relation_error_names_each_keys_source(tmp_path: Path) -> None:
    recipe = write(tmp_path / "recipe.yaml", "data: {image_size: 30}\n")
    message = error(recipe, ["model.patch_size=4"], PretrainConfig)
    assert message.startswith("model.patch_size = 4 must divide data.image_size = 30")
    assert f"model.patch_size in command line, data.image_size in {recipe}" in message
    assert "28 or 32" in message  # the nearest image sizes that work
    message = error(None, ["train.warmup_epochs=100"], PretrainConfig)  # epochs left at its default
    assert "train.epochs in the schema default" in message


def test_grid_relations_accept_their_limits() -> None:
    grid = ["model.patch_size=4", "data.image_size=28"]  # 7 × 7 = 49 patches
    one_patch = load_config(None, [*grid, "method.local.keep_ratio=0.0205"], PretrainConfig)
    assert one_patch.method.local.keep_ratio == 0.0205  # 1 patch
    assert "at least 0.0204 (one of 49 patches)" in error(None, [*grid, "method.local.keep_ratio=0.02"], PretrainConfig)
    assert load_config(None, [*grid, "model.top_k=49"], FinetuneConfig).model.top_k == 49
    assert "at most 49" in error(None, [*grid, "model.top_k=50"], FinetuneConfig)


def test_pretraining_min_lr_is_compared_with_the_scaled_lr() -> None:
    # one process: lr = base_lr * batch_size * grad_accum_steps / 256 = 1e-3 * 64 * 2 / 256 = 5e-4
    settings = ["train.base_lr=1e-3", "train.batch_size=64", "train.grad_accum_steps=2"]
    assert load_config(None, [*settings, "train.min_lr=5e-4"], PretrainConfig).train.min_lr == 5e-4
    message = error(None, [*settings, "train.min_lr=6e-4"], PretrainConfig)
    assert message.endswith("lower train.min_lr to at most 0.0005")


def test_check_warmup() -> None:
    cfg = load_config(None, ["train.warmup_steps=500"], FinetuneConfig)
    check_warmup(cfg, "train.warmup_steps", 501)
    check_warmup(load_config(None, ["train.warmup_steps=0"], FinetuneConfig), "train.warmup_steps", 1)
    with pytest.raises(ConfigError) as info:
        check_warmup(cfg, "train.warmup_steps", 156)
    assert str(info.value) == (
        "train.warmup_steps: 500 warmup steps are not fewer than the run's 156 optimizer steps, so the lr would "
        "never leave warmup (in command line); set train.warmup_steps below 156 (e.g. 15) or train more epochs"
    )
    with pytest.raises(ConfigError, match=r"\(in the schema default\)"):
        check_warmup(FinetuneConfig(), "train.warmup_steps", 500)


def test_a_timm_default_patch_size_that_does_not_divide_the_image_size_fails_at_model_build() -> None:
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    with pytest.raises(ConfigError) as info:
        create_vit("vit_tiny_patch16_224", {"img_size": 28, **tiny})
    assert str(info.value).startswith("data.image_size: 28 is not a multiple of the patch size 16 of vit_tiny_patch16")
    assert "model.patch_size" in str(info.value) and "16 or 32" in str(info.value)
    assert create_vit("vit_tiny_patch16_224", {"img_size": 32, **tiny}).patch_embed.grid_size == (2, 2)


RECIPES = sorted(Path(__file__).resolve().parents[1].glob("configs/*/*.yaml"))
SCHEMA_OF = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "datasets": EvalConfig, "study": StudyConfig}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_bundled_recipe_validates(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(recipe.parents[2])  # studies name their recipes relative to the repository
    cfg = load_config(recipe, [], SCHEMA_OF[recipe.parent.name])
    if recipe.parent.name == "datasets":
        load_config(recipe, [], PretrainConfig)
        load_config(recipe, [], FinetuneConfig)
    if recipe.parent.name == "study":
        Study(cfg)  # loads every arm's recipe with its overrides and the study's budget
