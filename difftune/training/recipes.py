"""Measured training recipes per base model: the defaults of flags a user does not give.

A recipe is what a measurement found to work with one method on one base model
(``docs/recipes.md`` has the runs behind each number). Each trainer has its own table:
`RECIPES` for the subject trainer (learning a subject), `ONE_STEP_RECIPES` for the
one-step (HiPA) trainer. A trainer applies the recipe of its base model and method to
every flag left unset, on the command line and in ``--config``, and prints what it
applied; a flag given by the user always wins, and ``--no_recipe`` turns recipes off.

Prior preservation in a recipe takes the class prompt from the subject folder's
``subject.json`` and keeps its class images in ``<output_dir>/class_images`` unless the
flags say otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import DifftuneError
from ..io import read_text
from ..paths import ASSETS_DIR
from .data import SUBJECT_FILE, check_image_folder

# Found on the heart subject (docs/recipes.md): 600 steps, batch 1, prior preservation with 50
# class images of the subject's class prompt; the text encoder trained where it helped.
_EMBEDDED_PRIOR = {"max_train_steps": 600, "with_prior_preservation": True, "num_class_images": 50}

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "builtin:embedded": {
        "lora": {"targets": ["all"], "rank": 16, "learning_rate": 1e-3, "train_text_encoder": True,
                 "prior_loss_weight": 0.3, **_EMBEDDED_PRIOR},
        "sara": {"sara_budget": 0.1, "learning_rate": 3e-3, **_EMBEDDED_PRIOR},
        "svfit": {"learning_rate": 3e-3, "train_text_encoder": True, "prior_loss_weight": 0.3,
                  **_EMBEDDED_PRIOR},
        "tlora": {"learning_rate": 1e-3, "train_text_encoder": True, "prior_loss_weight": 0.3,
                  **_EMBEDDED_PRIOR},
    },
}

# Methods without a recipe, and why: the run falls back to the plain defaults for them.
WITHOUT_RECIPE: dict[str, str] = {
    "peft": "what works depends on --peft_type (LoHa, OFT and Super-Tuning want very different rates)",
    "full_ft": "never measured on a subject; the style benchmark sweeps its rate on a style domain",
}


# Found on held-out world captions (docs/hipa_embedded.md has every try): the student against the
# base one step and the 25-step teacher, measured by eval/world_quality.py --one_step_adapter.
ONE_STEP_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "builtin:embedded": {
        "lora": {"prompts_file": str(ASSETS_DIR / "one_step_world_prompts.txt"), "targets": ["all"],
                 "rank": 32, "learning_rate": 1e-3, "train_batch_size": 8, "max_train_steps": 4800},
    },
}

Recipes = dict[str, dict[str, dict[str, Any]]]


# --preset of the dataset trainer: one real checkpoint per trainable image model family with that
# family's usual resolution and learning rate, so one command trains a style folder on a GPU. The
# schedule, batch and step count are SaRA's style protocol (cosine, batch 4, 5000 steps at 512 px)
# scaled down for the larger models; starting points, not measured optima. "family" names the family
# the checkpoint belongs to (the tests run every preset on that family's tiny model).
# name: (family, checkpoint, resolution, batch, steps)
STYLE_PRESET_MODELS: dict[str, tuple[str, str, int, int, int]] = {
    "sd15": ("sd", "stable-diffusion-v1-5/stable-diffusion-v1-5", 512, 4, 5000),
    "sdxl": ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", 1024, 4, 3000),
    "sd3": ("sd3", "stabilityai/stable-diffusion-3.5-medium", 1024, 2, 3000),
    "flux": ("flux", "black-forest-labs/FLUX.1-dev", 1024, 1, 3000),
    "pixart": ("pixart", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 1024, 2, 3000),
    "flux2": ("flux2", "black-forest-labs/FLUX.2-dev", 1024, 1, 3000),
    "flux2-klein": ("flux2-klein", "black-forest-labs/FLUX.2-klein-4B", 1024, 1, 3000),
    "qwen-image": ("qwen-image", "Qwen/Qwen-Image", 1024, 1, 3000),
    "z-image": ("z-image", "Tongyi-MAI/Z-Image-Turbo", 1024, 1, 3000),
}


def _style_preset(family: str, model: str, resolution: int, batch: int, steps: int) -> dict[str, Any]:
    """The flags of one preset: gradient checkpointing above 512 px."""
    return {"family": family, "pretrained_model_name_or_path": model, "resolution": resolution,
            "learning_rate": 1e-4, "train_batch_size": batch, "max_train_steps": steps,
            "enable_bucket": True, "random_flip": True, "caption_dropout": 0.05, "lr_scheduler": "cosine",
            "lr_warmup_steps": 100, "mixed_precision": "bf16", "checkpointing_steps": 500,
            "checkpoints_total_limit": 3, "validation_steps": 500,
            **({"gradient_checkpointing": True} if resolution > 512 else {})}


DATASET_PRESETS: dict[str, dict[str, Any]] = {name: _style_preset(*row)
                                              for name, row in STYLE_PRESET_MODELS.items()}


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """``--preset`` of the dataset trainer, in a group of its own."""
    listed = "; ".join(f"{name}: {preset['pretrained_model_name_or_path']} at {preset['resolution']} px"
                       for name, preset in DATASET_PRESETS.items())
    parser.add_argument_group("preset").add_argument(
        "--preset", choices=sorted(DATASET_PRESETS),
        help=f"fill every flag left unset from a real model's settings for a style folder on a GPU "
             f"({listed}; buckets, flips, 5 %% caption dropout, cosine schedule, bf16); flags given win, the "
             "run prints what it applied")


def apply_preset(args: argparse.Namespace, given: set[str]) -> dict[str, Any]:
    """Set ``--preset``'s values on ``args`` for flags not in ``given``; returns what was applied."""
    if not getattr(args, "preset", None):
        return {}
    applied = {}
    for name, value in DATASET_PRESETS[args.preset].items():
        if name == "family" or name in given:
            continue
        setattr(args, name, value)
        applied[name] = value
    return applied


def recipe_for(model: str, method: str, table: Recipes = RECIPES) -> dict[str, Any]:
    return dict(table.get(model, {}).get(method, {}))


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    """``--no_recipe``, in a group of its own."""
    parser.add_argument_group("recipe").add_argument(
        "--no_recipe", action="store_true",
        help="do not fill unset flags from the base model's measured recipe (builtin:embedded has one "
             "per method; the run prints what it applied)")


def given_destinations(parser: argparse.ArgumentParser, tokens: list[str]) -> set[str]:
    """The ``dest`` of every flag present in ``tokens`` (defaults left out)."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(tokens)))
    finally:
        for action, default in defaults.items():
            action.default = default


def apply_recipe(args: argparse.Namespace, given: set[str], table: Recipes = RECIPES) -> dict[str, Any]:
    """Set the recipe's values on ``args`` for flags not in ``given``; returns what was applied."""
    if getattr(args, "no_recipe", False):
        return {}
    recipe = recipe_for(args.pretrained_model_name_or_path, args.adapter, table)
    applied = {}
    for name, value in recipe.items():
        if name in given or not hasattr(args, name):
            continue
        setattr(args, name, value)
        applied[name] = value
    if getattr(args, "with_prior_preservation", False) and "with_prior_preservation" in applied:
        if not args.class_prompt:
            args.class_prompt = subject_class_prompt(args.instance_data_dir)
            applied["class_prompt"] = args.class_prompt
        if not args.class_data_dir and args.output_dir:
            args.class_data_dir = str(Path(args.output_dir) / "class_images")
            applied["class_data_dir"] = args.class_data_dir
    return applied


def subject_class_prompt(instance_data_dir: str | None) -> str:
    """The ``class_prompt`` of a subject folder's ``subject.json``; a clear error when there is none. A
    missing folder or an unreadable image in it is said first: that is what the user has to fix."""
    if instance_data_dir:
        check_image_folder(instance_data_dir, "--instance_data_dir")
    path = Path(instance_data_dir or ".") / SUBJECT_FILE
    try:
        subject = json.loads(read_text(path)) if path.is_file() else {}
    except json.JSONDecodeError as error:
        raise DifftuneError(f"{path}: unreadable ({error})") from None
    prompt = subject.get("class_prompt") if isinstance(subject, dict) else None
    if not prompt:
        raise DifftuneError(f"the recipe trains with prior preservation but {path} gives no class_prompt: "
                            "pass --class_prompt, or --no_recipe")
    return prompt


def source_hint(args: argparse.Namespace, name: str) -> str:
    """A note for an error about ``--name`` when the recipe, not the user, set it (else empty)."""
    if name not in getattr(args, "recipe", {}):
        return ""
    return f" (--{name} came from the {args.pretrained_model_name_or_path} recipe; --no_recipe turns it off)"


def describe(applied: dict[str, Any], model: str, method: str) -> str:
    """One line for the log: which recipe filled which flags."""
    if not applied:
        return ""
    values = ", ".join(f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
                       for name, value in applied.items())
    return f"recipe for {model} + {method} (measured, docs/recipes.md): {values}"
