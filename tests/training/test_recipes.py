"""Measured recipes fill the flags a user leaves unset, for the base model and method they name."""

import json

import pytest

import difftune
from difftune.training import recipes

STAR = "assets/subjects/star"


def parse(train_subject, *flags, model="builtin:embedded", method="lora"):
    return train_subject.module.parse_args(
        ["--pretrained_model_name_or_path", model, "--instance_data_dir", STAR, "--instance_prompt",
         "a large sks orange star", "--adapter", method, "--output_dir", "out", *map(str, flags)])


@pytest.mark.parametrize("method", sorted(set(difftune.METHODS) - set(recipes.WITHOUT_RECIPE)))
def test_every_method_has_a_recipe_for_the_embedded_model(train_subject, method):
    recipe = recipes.recipe_for("builtin:embedded", method)
    args = parse(train_subject, method=method)
    for name, value in recipe.items():
        assert getattr(args, name) == value, name
    prior = {"class_prompt": "a large orange star", "class_data_dir": "out/class_images"}
    assert args.recipe == {**recipe, **prior}


@pytest.mark.parametrize("method", sorted(recipes.WITHOUT_RECIPE))
def test_a_method_without_a_recipe_keeps_the_plain_defaults(train_subject, method):
    assert method in difftune.METHODS and recipes.recipe_for("builtin:embedded", method) == {}
    args = parse(train_subject, method=method)
    assert args.recipe == {} and args.learning_rate is None and not args.with_prior_preservation


def test_given_flags_win_over_the_recipe(train_subject, tmp_path):
    args = parse(train_subject, "--learning_rate", 5e-4, "--rank", 2)
    assert args.learning_rate == 5e-4 and args.rank == 2
    assert "learning_rate" not in args.recipe and "rank" not in args.recipe
    assert args.max_train_steps == recipes.recipe_for("builtin:embedded", "lora")["max_train_steps"]
    # a flag given in --config counts as given too
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"max_train_steps": 7}))
    args = parse(train_subject, "--config", config)
    assert args.max_train_steps == 7 and "max_train_steps" not in args.recipe
    # an explicit prior prompt and folder are kept
    args = parse(train_subject, "--class_prompt", "a large red star", "--class_data_dir", tmp_path)
    assert args.class_prompt == "a large red star" and args.class_data_dir == str(tmp_path)


def test_no_recipe_and_other_models_keep_the_plain_defaults(train_subject):
    plain = parse(train_subject, "--no_recipe")
    assert plain.recipe == {} and plain.learning_rate is None and not plain.with_prior_preservation
    hub = parse(train_subject, model="builtin:tiny-sd")
    assert hub.recipe == {} and hub.max_train_steps is None


def test_recipe_prior_needs_a_class_prompt(train_subject, tmp_path):
    from conftest import make_subject_images

    make_subject_images(tmp_path, count=1)  # a readable image: a broken one is said first
    with pytest.raises(difftune.DifftuneError, match=r"subject\.json gives no class_prompt.*--no_recipe"):
        train_subject.module.parse_args(["--pretrained_model_name_or_path", "builtin:embedded",
                                         "--instance_data_dir", str(tmp_path), "--instance_prompt", "a sks x",
                                         "--output_dir", str(tmp_path / "out")])


def test_describe_names_every_applied_flag():
    line = recipes.describe({"learning_rate": 0.001, "targets": ["all"]}, "builtin:embedded", "lora")
    assert line == ("recipe for builtin:embedded + lora (measured, docs/recipes.md): --learning_rate 0.001, "
                    "--targets all")
    assert recipes.describe({}, "m", "lora") == ""


def test_a_conflict_with_a_recipe_flag_names_the_recipe(train_subject):
    with pytest.raises(difftune.DifftuneError, match=r"--train_text_encoder came from the builtin:embedded "
                                                      r"recipe; --no_recipe turns it off"):
        parse(train_subject, "--pre_compute_text_embeddings")
    plain = parse(train_subject, "--pre_compute_text_embeddings", "--no_recipe")
    assert plain.pre_compute_text_embeddings and not plain.train_text_encoder


def test_one_step_trainer_takes_its_own_recipe_table():
    from conftest import command_module

    one_step = command_module("train_one_step")
    recipe = recipes.recipe_for("builtin:embedded", "lora", recipes.ONE_STEP_RECIPES)
    assert recipe and recipe != recipes.recipe_for("builtin:embedded", "lora")
    base = ["--pretrained_model_name_or_path", "builtin:embedded", "--output_dir", "out"]
    args = one_step.parse_args(base)
    for name, value in recipe.items():
        assert getattr(args, name) == value, name
    assert args.recipe == recipe and not hasattr(args, "with_prior_preservation")
    given = one_step.parse_args([*base, "--learning_rate", "5e-5", "--prompts_file", "mine.txt"])
    assert given.learning_rate == 5e-5 and given.prompts_file == "mine.txt"
    assert "learning_rate" not in given.recipe and "prompts_file" not in given.recipe
    plain = one_step.parse_args([*base, "--no_recipe"])
    assert plain.recipe == {} and plain.prompts_file == str(one_step.DEFAULT_PROMPTS)
    assert one_step.parse_args(["--pretrained_model_name_or_path", "builtin:tiny-sd"]).recipe == {}


def test_the_default_checkpoint_interval_spares_short_runs_and_protects_long_ones(train_subject):
    default = train_subject.module.build_parser().get_default("checkpointing_steps")
    subject_steps = [recipe["max_train_steps"] for methods in recipes.RECIPES.values()
                     for recipe in methods.values()]
    one_step = [recipe["max_train_steps"] for methods in recipes.ONE_STEP_RECIPES.values()
                for recipe in methods.values()]
    assert subject_steps and max(subject_steps) < default  # the main job writes no checkpoint it never uses
    assert min(one_step) >= 2 * default  # a 4800-step run still saves along the way
