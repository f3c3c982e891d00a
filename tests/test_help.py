"""--help of the trainers: every flag says its default, and the flags a recipe fills say its values."""

import argparse
import re

import pytest
from conftest import load_script

from difftune.paths import portable_path
from difftune.training import recipes

TRAINERS = {"train_scripts/train_subject.py": recipes.RECIPES,
            "train_scripts/train_one_step.py": recipes.ONE_STEP_RECIPES}


def shown_help(parser):
    """Each flag's help as --help prints it (before line wrapping), by destination."""
    formatter = parser.formatter_class(prog="x")
    return {action.dest: formatter._get_help_string(action) % {} for action in parser._actions
            if action.option_strings and action.dest != "help"}


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_every_flag_shows_its_default(script):
    parser = load_script(script).build_parser()
    assert parser.format_help()  # it renders
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        shown = shown_help(parser)[action.dest]
        assert "default" in shown or "required" in shown, f"{action.option_strings[0]}: {shown}"
        default = action.default
        plain = default not in (None, argparse.SUPPRESS, [], "") and not isinstance(default, bool)
        if plain and "default" not in (action.help or ""):
            assert f"(default: {portable_path(action.default)})" in shown, shown
        assert str(recipes.ASSETS_DIR) not in shown  # a shipped file by its portable name


@pytest.mark.parametrize("script", sorted(TRAINERS))
def test_the_flags_a_recipe_fills_say_its_values(script):
    parser = load_script(script).build_parser()
    shown = shown_help(parser)
    table = TRAINERS[script]
    assert table
    for model, methods in table.items():
        for method, recipe in methods.items():
            for dest, value in recipe.items():
                value_text = " ".join(map(str, value)) if isinstance(value, list) else \
                    ("on" if value else "off") if isinstance(value, bool) else str(portable_path(value))
                note = re.search(rf"\[{re.escape(model)} recipe: ([^\]]*)\]", shown[dest]).group(1)
                assert value_text in note and (method in note or "(every method)" in note), (dest, note)
