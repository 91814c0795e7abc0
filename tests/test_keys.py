"""--help-keys: every config key of a command with its type, default, range and meaning, from the declarations."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sslfg.commands import embed, finetune, knn, linear, localise, pretrain
from sslfg.config import _keys
from sslfg.keys import format_keys, key_docs
from sslfg.schema import EvalConfig, FinetuneConfig, PretrainConfig, StudyConfig
from sslfg.study import run as study

SCHEMAS = (PretrainConfig, EvalConfig, FinetuneConfig, StudyConfig)
COMMANDS: dict[str, tuple[Callable, type]] = {
    "train_ssl.py": (pretrain.main, PretrainConfig), "eval.finetune": (finetune.main, FinetuneConfig),
    "eval.knn": (knn.main, EvalConfig), "eval.linear": (linear.main, EvalConfig),
    "eval.localise": (localise.main, EvalConfig), "eval.embed": (embed.main, EvalConfig),
    "sslfg.study": (study.main, StudyConfig)}


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_key_is_listed_with_its_type_default_and_range(schema: type) -> None:
    docs = {doc.key: doc for doc in key_docs(schema)}
    assert list(docs) == list(_keys(schema, "", leaves_only=True))  # every key a recipe may set, in order
    text = format_keys(schema)
    for doc in docs.values():
        assert f"{doc.key} ({doc.type}) = {doc.default!r}" in text
    if schema is PretrainConfig:
        assert docs["data.image_size"].range == "[1, 4096]" and docs["data.image_size"].default == 224
        assert docs["data.format"].type == "one of csv, imagefolder, folder, shards"
        assert docs["augment.crop_scale"].default == [0.08, 1.0]
        assert docs["train.knn_every"].meaning.startswith("online kNN (k 20) of the online encoder every n epochs")
        assert docs["train.epochs"].meaning.startswith("passes over the training split")  # inherited from LoopConfig


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_key_has_a_meaning(schema: type) -> None:
    """sslfg/schema.py documents each key where it declares it, sslfg/method_config.py the method.* keys."""
    assert [doc.key for doc in key_docs(schema) if not doc.meaning] == []


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_no_command_prints_an_undocumented_key(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        COMMANDS[command][0](["--help-keys"])
    lines = capsys.readouterr().out.splitlines()
    assert [key for key, meaning in zip(lines, lines[1:], strict=False) if "(undocumented)" in meaning] == []


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_every_command_lists_its_keys(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    main, schema = COMMANDS[command]
    with pytest.raises(SystemExit) as stop:
        main(["--help-keys"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == format_keys(schema)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--help-keys" in capsys.readouterr().out
