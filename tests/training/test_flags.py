"""One definition per trainer flag: every flag of a trainer is generated from one dataclass field
(`difftune.options.option`), every settings field has its flag, values reach the settings, and the
checks run on flags and on settings made in code alike."""

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import pytest
from conftest import command_module

from difftune.errors import DifftuneError
from difftune.families import FAMILIES, LossOptions, flag_families
from difftune.hipa.loss import HiPALossConfig
from difftune.hipa.teacher import TeacherSettings
from difftune.options import CheckedSettings, at_least, check_values, is_option, option, option_choices
from difftune.paths import SUBJECTS_DIR, builtin_subjects
from difftune.training import arguments, settings
from difftune.tuners import Adapter

TRAINERS = ["train_subject", "train_one_step"]
# flags that are no setting: the config file and the recipe switch (training/recipes.py)
NOT_SETTINGS = {"help", "config", "no_recipe"}
# option sets generated with a prefix (`add_dataclass_arguments`), read by `dataclass_from_args`
PREFIXED = {TeacherSettings, HiPALossConfig}


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest not in NOT_SETTINGS]


@pytest.mark.parametrize("command", TRAINERS)
def test_every_trainer_flag_is_generated_from_one_field_of_its_settings(command):
    module = command_module(command)
    actions = flag_actions(module.build_parser())
    owners = {*module.SETTINGS, Adapter, *PREFIXED}
    handwritten = [a.option_strings[0] for a in actions if not hasattr(a, "option_owner")]
    assert not handwritten, f"flags written by hand, not from a settings field: {handwritten}"
    strangers = [a.option_strings[0] for a in actions if a.option_owner not in owners]
    assert not strangers, f"flags of classes missing from {command}.SETTINGS: {strangers}"
    dests = [a.dest for a in actions]
    assert len(dests) == len(set(dests)), "a flag is defined twice"


@pytest.mark.parametrize("command", TRAINERS)
def test_every_settings_field_has_its_flag_made_from_it(command):
    module = command_module(command)
    actions = {a.dest: a for a in flag_actions(module.build_parser())}
    for settings_class in module.SETTINGS:
        for field in dataclasses.fields(settings_class):
            assert field.name in actions, f"{settings_class.__name__}.{field.name} has no flag in {command}"
            if is_option(field):  # a plain field is filled from another class's flag of its name
                assert actions[field.name].option_field is field, f"--{field.name} is not made from its field"
            else:
                assert any(field.name in {f.name for f in dataclasses.fields(other) if is_option(f)}
                           for other in module.SETTINGS if other is not settings_class)


def example_value(field: dataclasses.Field, annotation, default):
    """A value of the field's type, other than its default, that passes the field's check."""
    check = field.metadata.get("check")
    annotation = arguments._without_none(annotation)
    choices = option_choices(field)
    if choices:
        value = next(c for c in choices if c != default)
        return [value] if typing.get_origin(annotation) is list else value
    if annotation is bool:
        return not default
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # --resolution: a side or HxW
        annotation = typing.get_args(annotation)[0]
    candidates = {int: [3, 8, 16], float: [0.25, 0.5], str: ["xyz"], Path: ["somewhere/else"]}
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        values = ["a.b", "c"] if item is str else candidates[item][:2]
        assert check is None or check.test(values)
        return values
    return next(v for v in candidates[annotation] if v != default and (check is None or check.test(v)))


def flag_tokens(action: argparse.Action, value) -> list[str]:
    if isinstance(value, bool):
        if isinstance(action, argparse.BooleanOptionalAction):
            return [f"--{action.dest}" if value else f"--no-{action.dest}"]
        assert value, f"--{action.dest} is a switch: it can only be turned on"
        return [f"--{action.dest}"]
    if isinstance(value, list):
        return [f"--{action.dest}", *map(str, value)]
    return [f"--{action.dest}", str(value)]


@pytest.mark.parametrize("command", TRAINERS)
def test_each_flag_value_reaches_its_settings(command):
    module = command_module(command)
    parser = module.build_parser()
    actions = {a.dest: a for a in flag_actions(parser)}
    for settings_class in module.SETTINGS:
        hints = typing.get_type_hints(settings_class)
        expected, argv = {}, []
        for field in dataclasses.fields(settings_class):
            if not is_option(field):
                continue
            value = example_value(field, hints[field.name], actions[field.name].default)
            expected[field.name] = value
            argv += flag_tokens(actions[field.name], value)
        made = arguments.settings_from_args(parser.parse_args(argv), settings_class)
        for name, value in expected.items():
            wanted = Path(value) if hints[name] is Path else value
            assert getattr(made, name) == wanted, (settings_class.__name__, name)


def test_a_field_without_a_flag_is_an_error_not_a_silent_default():
    @dataclasses.dataclass(frozen=True)
    class Drifted:
        learning_rate: float = 1.0
        lerning_rate: float = 2.0  # a name the parser does not have

    args = argparse.Namespace(learning_rate=0.5)
    with pytest.raises(TypeError, match=r"Drifted.lerning_rate: the parser has no --lerning_rate flag"):
        arguments.settings_from_args(args, Drifted)
    assert arguments.settings_from_args(args, Drifted, partial=True) == Drifted(0.5, 2.0)


def test_the_same_check_runs_on_flags_and_on_settings_made_in_code():
    parser = argparse.ArgumentParser()
    arguments.add_model_arguments(parser)
    arguments.add_training_arguments(parser)
    cases = [
        (settings.OptimizerSettings, "adam_beta1", 2.0, r"--adam_beta1 must be in \[0, 1\), got 2.0"),
        (settings.CheckpointSettings, "checkpointing_steps", 0, "--checkpointing_steps must be at least 1"),
        (LossOptions, "max_sequence_length", 600, r"must be in \[1, 512\] \(FLUX.1's T5 limit\), got 600"),
        (settings.ValidationSettings, "num_validation_images", 0, "--num_validation_images must be at least"),
    ]
    for settings_class, name, value, message in cases:
        with pytest.raises(DifftuneError, match=message):
            settings_class(**{name: value})
        args = parser.parse_args([f"--{name}", str(value)])
        with pytest.raises(DifftuneError, match=message):
            arguments.check_common_arguments(args)
    assert settings.OptimizerSettings(adam_beta1=0.5).adam_beta1 == 0.5


def test_a_new_settings_class_becomes_flags_with_its_checks_and_choices():
    @dataclasses.dataclass(frozen=True)
    class Toy(CheckedSettings):
        flag_group: typing.ClassVar[str] = "toy"
        steps: int = option(2, "steps", check=at_least(1))
        mode: str = option("a", "mode", choices=lambda: ("a", "b"))
        names: list[str] | None = option(None, "names")
        fast: bool = option(False, "go fast")
        slow: bool = option(True, "go slow")
        elsewhere: int = option(0, "listed in another group", group="other")

    parser = argparse.ArgumentParser()
    assert arguments.add_settings_arguments(parser, Toy) == ["steps", "mode", "names", "fast", "slow"]
    args = parser.parse_args(["--steps", "5", "--mode", "b", "--names", "x", "y", "--fast", "--no-slow"])
    assert vars(args) == {"steps": 5, "mode": "b", "names": ["x", "y"], "fast": True, "slow": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(DifftuneError, match="--steps must be at least 1, got 0"):
        check_values(parser.parse_args(["--steps", "0"]), Toy)
    assert [g.title for g in parser._action_groups][-1] == "toy"
    assert arguments.add_settings_arguments(parser, Toy, title="other") == ["elsewhere"]


def test_family_flags_name_the_families_that_take_them_and_their_defaults():
    parser = command_module("train_subject").build_parser()
    for action in flag_actions(parser):
        takers = [f for f in FAMILIES.values() if f.trainable and action.dest in f.applicable_flags()]
        if not takers or action.option_owner is Adapter:
            continue
        assert action.help.startswith(f"{flag_families(action.dest)}: "), action.dest
        for family in FAMILIES.values():
            if action.dest in family.option_defaults and family in takers:
                assert str(family.option_defaults[action.dest]) in action.help, (action.dest, family.name)


def test_shipped_subjects_are_named_builtin(capsys):
    module = command_module("train_subject")
    parser = module.build_parser()
    args = parser.parse_args(["--instance_data_dir", "builtin:heart"])
    assert Path(args.instance_data_dir) == SUBJECTS_DIR / "heart"
    assert (Path(args.instance_data_dir) / "subject.json").is_file()
    assert parser.parse_args(["--instance_data_dir", "my/folder"]).instance_data_dir == "my/folder"
    with pytest.raises(SystemExit):
        parser.parse_args(["--instance_data_dir", "builtin:hart"])
    error = capsys.readouterr().err
    assert "builtin:hart is not a built-in subject" in error
    assert all(f"builtin:{name}" in error for name in builtin_subjects())
    assert {"heart", "star"} <= set(builtin_subjects())
