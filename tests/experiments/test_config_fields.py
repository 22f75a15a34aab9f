"""Each TrainConfig field is declared once (``samkit.experiments.config.option``): the ``samkit`` parsers, --help
and summary.json read that declaration, so every field is reachable from the command line and lands where it says."""

from __future__ import annotations

import dataclasses
import json

import pytest

from samkit.cli import _given_fields, _method_options, build_parser
from samkit.experiments.config import BOTH, TrainConfig
from samkit.experiments.recipes import RECIPES, build_config

FIELDS = dataclasses.fields(TrainConfig)


def _parsers():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    return commands["train"], commands["compare"]


def _flags(parser) -> dict[str, object]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def _flag(field) -> str:
    return field.metadata["cli"]["flag"] or "--" + field.name.replace("_", "-")


def test_every_field_is_declared_and_offered_by_the_commands_it_names():
    train, compare = _parsers()
    train_flags, compare_flags = _flags(train), _flags(compare)
    for field in FIELDS:
        cli = field.metadata.get("cli")
        assert cli is not None, f"TrainConfig.{field.name} is not declared with option(...)"
        assert _flag(field) in train_flags, field.name
        assert (_flag(field) in compare_flags) == (cli["commands"] == BOTH), field.name
    assert len(train_flags) > len(FIELDS)  # the fields, and the command's own flags (--out, --resume, ...)


def _text_for(field) -> tuple[str, object]:
    """A value to type for the field, and what the config must then hold."""
    cli = field.metadata["cli"]
    if cli["choices"]:
        return cli["choices"][-1], cli["choices"][-1]
    kind = float if cli["grid"] else cli["type"]
    if kind is int:
        return "3", 3
    if kind is float:
        return "0.25", 0.25
    return "some-text", "some-text"


@pytest.mark.parametrize("field", [f for f in FIELDS if not f.metadata["cli"]["by_hand"]], ids=lambda f: f.name)
def test_each_field_typed_on_the_train_line_reaches_the_config(field):
    text, value = _text_for(field)
    args = build_parser().parse_args(["train", "--out", "DIR", _flag(field), text])
    given = _given_fields(args, "train")
    assert given == {field.name: value}
    assert getattr(TrainConfig(**given), field.name) == value


def test_the_fields_built_by_hand_reach_the_config_too():
    args = build_parser().parse_args(["train", "--out", "DIR", "--option", "k=5", "--recipe", next(iter(RECIPES))])
    config = build_config(args.recipe, dict(_given_fields(args, "train"), options=_method_options(args.option)))
    assert config.options == {"k": "5"} and config.recipe == next(iter(RECIPES))


def test_compare_takes_the_shared_fields_and_leaves_the_grids_to_its_lists():
    args = build_parser().parse_args(["compare", "--epochs", "3", "--lr", "0.1,0.2", "--rho", "0.05"])
    assert _given_fields(args, "compare") == {"epochs": 3}
    assert (args.lr, args.rho) == ([0.1, 0.2], [0.05])


def test_help_shows_every_offered_field_with_its_declared_text(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for field in FIELDS:
        cli = field.metadata["cli"]
        assert _flag(field) in shown, field.name
        if cli["help"] and not cli["by_hand"]:
            assert " ".join(cli["help"].split()) in shown, field.name
        if cli["show_default"]:
            assert f"default {'none' if field.default is None else field.default}" in shown, field.name


def test_the_summary_repeats_the_fields_declared_for_it(finished_run):
    out, summary = finished_run
    config = json.loads((out / "config.json").read_text())
    declared = [f.name for f in FIELDS if f.metadata["summary"]]
    assert {"optimizer", "seed", "lr", "rho", "epochs", "data", "model"} <= set(declared)
    for name in declared:
        assert summary[name] == config[name], name
    for name in {f.name for f in FIELDS} - set(declared) - {"label_noise"}:  # label_noise: the labels' own
        assert name not in summary, name
