"""Command-line and config-file options for the training scripts.

Three things live here so every trainer shares them:

* `add_method_arguments` turns each registered method's config dataclass into flags,
  from its fields and their ``option(default, help)`` metadata. Fields that several
  methods share by name (``rank``, ``alpha``) become plain flags (``--rank``); the rest
  are prefixed with the method (``--lora_dropout``, ``--sara_threshold``). A method that
  registers gets its flags without touching any script.
* `parse_with_config` reads ``--config file.yaml|json`` and then the command line; the
  file's entries are turned into flags placed before the real ones, so argparse checks
  types and choices of both the same way and the command line wins.
* `adapter_options` collects the options of the chosen method and refuses flags that
  belong to another one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..api import AdapterSpec
from ..errors import DifftuneError
from ..families import FAMILIES, check_flags, flag_defaults, flag_families, get_family
from ..model_factory import builtin_names
from ..options import check_finite_numbers
from ..tuners import METHODS, Adapter, get_method
from . import pivotal
from .settings import QUANTIZATION_BACKENDS

# Field names that mean the same thing across methods: one flag, no method prefix.
SHARED_OPTION_NAMES = ("rank", "alpha")
# Extra spellings users know from diffusers' scripts, keyed by destination.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"alpha": ("--lora_alpha",), "lora_use_dora": ("--use_dora",)}
# Fields the trainer exposes itself (``--targets``), not per method.
TRAINER_LEVEL_FIELDS = ("targets",)
METHOD_GROUP_TITLE = "adapter method options"
# Above this AdamW's update overflows float32 or wrecks any adapter within a step or two.
MAX_LEARNING_RATE = 1.0


@dataclasses.dataclass(frozen=True)
class MethodFlag:
    """One generated flag: which methods it serves and under which field name."""

    dest: str
    field: str
    methods: tuple[str, ...]


def option_dest(method: str, field: str) -> str:
    return field if field in SHARED_OPTION_NAMES else f"{method}_{field}"


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _members(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if _is_union(annotation) else (annotation,)


def _without_none(annotation: Any) -> Any:
    """``X | None`` → ``X`` (a flag that is not given is None anyway)."""
    members = [m for m in _members(annotation) if m is not type(None)]
    return members[0] if len(members) == 1 else typing.Union[tuple(members)]  # noqa: UP007


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _value_parser(annotation: Any):
    """A function turning the flag text into the field's type (bool, then int, float, str)."""
    priority = {bool: 0, int: 1, float: 2, str: 3}
    members = sorted((m for m in _members(annotation) if m is not type(None)),
                     key=lambda m: priority.get(m, 4))
    if typing.get_origin(annotation) is typing.Literal:
        return str

    def parse(text: str) -> Any:
        for member in members:
            try:
                if member is bool:
                    return _parse_bool(text)
                if member in (int, float):
                    return member(text)
                if member is str:
                    return text
            except (ValueError, argparse.ArgumentTypeError):
                continue
        kinds = " or ".join(getattr(m, "__name__", str(m)) for m in members)
        raise argparse.ArgumentTypeError(f"expected {kinds}, got {text!r}")

    parse.__name__ = "/".join(getattr(m, "__name__", str(m)) for m in members)
    return parse


def method_fields(adapter_class: type[Adapter]) -> list[tuple[dataclasses.Field, Any]]:
    """The config fields of a method that become flags, with their resolved types."""
    config_class = adapter_class.config_class
    hints = typing.get_type_hints(config_class)
    return [(field, hints[field.name]) for field in dataclasses.fields(config_class)
            if field.name not in TRAINER_LEVEL_FIELDS]


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def add_method_arguments(parser: argparse.ArgumentParser) -> list[MethodFlag]:
    """Add one flag per method option (see the module docstring); all default to None."""
    group = parser.add_argument_group(
        METHOD_GROUP_TITLE, "generated from each registered method's options; a flag not given "
        "keeps the method's default, and a flag of another method than --adapter is refused")
    entries: dict[str, dict[str, Any]] = {}
    for method in sorted(METHODS):
        for field, annotation in method_fields(METHODS[method]):
            dest = option_dest(method, field.name)
            entry = entries.setdefault(dest, {"field": field.name, "annotations": [], "methods": [],
                                              "help": []})
            entry["methods"].append(method)
            entry["annotations"].append(annotation)
            text = field.metadata.get("help", field.name)
            if "default" not in text:
                text += f" (default: {_default_of(field)})"
            entry["help"].append(f"{method}: {text}")
    flags = []
    for dest, entry in entries.items():
        # a shared flag (--rank) takes the values any of its methods accepts
        annotation = _without_none(typing.Union[tuple(entry["annotations"])])  # noqa: UP007
        names = [f"--{dest}", *FLAG_ALIASES.get(dest, ())]
        help_text = "; ".join(entry["help"]).replace("%", "%%")  # argparse formats help with %
        if annotation is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif typing.get_origin(annotation) in (list, tuple):
            (item,) = typing.get_args(annotation)[:1]
            group.add_argument(*names, dest=dest, nargs="+", type=_value_parser(item), default=None,
                               help=help_text)
        else:
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
            group.add_argument(*names, dest=dest, type=_value_parser(annotation), choices=choices,
                               default=None, metavar=dest.upper(), help=help_text)
        flags.append(MethodFlag(dest, entry["field"], tuple(entry["methods"])))
    parser.set_defaults(_method_flags=flags)
    return flags


def adapter_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Options for ``difftune.add_adapter(..., method, **options)`` from the parsed flags.

    Refuses a flag given for another method, naming the flag and its method.
    """
    options: dict[str, Any] = {}
    for flag in args._method_flags:
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if method not in flag.methods:
            owners = ", ".join(flag.methods)
            raise DifftuneError(
                f"--{flag.dest} is an option of --adapter {owners}, not of --adapter {method}")
        options[flag.field] = value
    return options


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_class: type, title: str,
                            prefix: str = "", description: str | None = None) -> list[str]:
    """One flag ``--<prefix><field>`` per field of an options dataclass (fields made with ``option()``).

    For option sets that are not adapter methods (a loss, a teacher sampler): the flag
    defaults to the field's default and its help is the field's help. Returns the dests.
    """
    group = parser.add_argument_group(title, description)
    hints = typing.get_type_hints(config_class)
    dests = []
    for field in dataclasses.fields(config_class):
        annotation, default, dest = hints[field.name], _default_of(field), prefix + field.name
        help_text = field.metadata.get("help", field.name)
        if "default" not in help_text:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if annotation is bool:
            group.add_argument(f"--{dest}", action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        else:
            group.add_argument(f"--{dest}", type=_value_parser(annotation), default=default,
                               metavar=dest.upper(), help=help_text)
        dests.append(dest)
    return dests


def dataclass_from_args(args: argparse.Namespace, config_class: type, prefix: str = "") -> Any:
    """The options dataclass filled from flags made by `add_dataclass_arguments`."""
    return config_class(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(config_class)})


def settings_from_args(args: argparse.Namespace, settings_class: type, skip_none: bool = False) -> Any:
    """A settings dataclass (training/settings.py) from the flags of the same names.

    A flag the parser does not have keeps the field's default; with ``skip_none`` so does a flag
    left unset (None), for settings whose defaults depend on what the flag would apply to.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class)
              if f.init and hasattr(args, f.name)}
    if skip_none:
        values = {name: value for name, value in values.items() if value is not None}
    return settings_class(**values)


def adapter_spec(args: argparse.Namespace) -> AdapterSpec:
    """The trained adapter (``--adapter``, ``--targets`` and the method's flags) as one spec, its
    options checked once here."""
    return AdapterSpec(args.adapter, args.targets, adapter_options(args, args.adapter))


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Every flag with a plain value, as the experiment tracker records a run's settings."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}


# --- config files -----------------------------------------------------------------------

def _config_flag_names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key a config file may use (destinations and long flag names without dashes)."""
    names: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        names[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no-"):
                names[option[2:]] = action
    return names


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping from a YAML or JSON file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise DifftuneError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:
        raise DifftuneError(f"--config {path}: cannot parse: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DifftuneError(f"--config {path}: expected a mapping of option names to values")
    return data


def config_to_argv(parser: argparse.ArgumentParser, config: dict[str, Any], source: str) -> list[str]:
    """Turn config entries into command-line tokens, so argparse validates them."""
    known = _config_flag_names(parser)
    tokens: list[str] = []
    for key, value in config.items():
        action = known.get(str(key).replace("-", "_")) or known.get(str(key))
        if action is None:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DifftuneError(f"{source}: unknown option '{key}'{hint}")
        flag = action.option_strings[0]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            tokens.append(flag if _as_bool(value, key, source) else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true style
            if _as_bool(value, key, source):
                tokens.append(flag)
        elif isinstance(value, (list, tuple)):
            tokens += [flag, *map(str, value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def _as_bool(value: Any, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return _parse_bool(str(value))
    except argparse.ArgumentTypeError:
        raise DifftuneError(f"{source}: option '{key}' must be true or false, got {value!r}") from None


def parse_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``, reading ``--config`` first; command-line flags override the file."""
    return parser.parse_args(command_tokens(parser, argv))


def command_tokens(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> list[str]:
    """The ``--config`` file's options as flags, then ``argv`` (so the command line wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file_tokens: list[str] = []
    if known.config:
        file_tokens = config_to_argv(parser, read_config_file(known.config), f"--config {known.config}")
    return file_tokens + argv


def flag_table_markdown(parser: argparse.ArgumentParser, skip_groups: Sequence[str] = ()) -> str:
    """The flags of ``parser`` as Markdown tables, one per argument group."""
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions or group.title in skip_groups:
            continue
        out.append(f"**{group.title}**\n\n| flag | default | meaning |\n|---|---|---|")
        for action in actions:
            names = ", ".join(f"`{o}`" for o in action.option_strings if not o.startswith("--no-"))
            default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default}`"
            text = (action.help or "").replace("%%", "%").replace("|", "\\|").replace("\n", " ")
            out.append(f"| {names} | {default} | {text} |")
        out.append("")
    return "\n".join(out)


# --- flag groups shared by the training scripts -----------------------------------------

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "polynomial")
WEIGHTING_SCHEMES = ("logit_normal", "sigma_sqrt", "mode", "cosmap", "none")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "none")


def _quantizable_methods() -> list[str]:
    return sorted(name for name, each in METHODS.items() if not each.quantized_base_refusal)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    builtins = sorted(builtin_names(), key=lambda name: "tiny" in name)  # the embedded model first
    families = ", ".join(family.title for family in FAMILIES.values())
    group.add_argument("--pretrained_model_name_or_path", default="builtin:embedded",
                       help=f"base model: a built-in name ({', '.join(builtins)}), a hub id or a local "
                            f"pipeline folder ({families})")
    group.add_argument("--revision", help="hub revision of the base model")
    group.add_argument("--variant", help="weight variant of the base model, e.g. fp16")
    group.add_argument("--prediction_type", choices=("epsilon", "v_prediction"),
                       help=f"{flag_families('prediction_type')} only: override the scheduler's prediction "
                            "type (default: the model's own)")


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter")
    group.add_argument("--adapter", default="lora", choices=sorted(METHODS),
                       help="adapter method to train")
    group.add_argument("--targets", nargs="+",
                       help="layers to adapt: presets attn, attn-ff, conv, all, regexes on module names or "
                            "module names; several are united (default: the method's default)")
    add_method_arguments(parser)


def add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimization")
    group.add_argument("--seed", type=int,
                       help="seed of everything random (default: drawn at random, printed and stored in "
                            "checkpoints so a resumed run continues with it)")
    group.add_argument("--train_batch_size", type=int, default=1, help="batch size per process")
    group.add_argument("--num_train_epochs", type=int, default=1,
                       help="epochs to train when --max_train_steps is not given")
    group.add_argument("--max_train_steps", type=int, help="optimizer steps to train (overrides epochs)")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="micro-batches accumulated per optimizer step")
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in the backward pass to save memory")
    group.add_argument("--learning_rate", type=float,
                       help="peak learning rate (default: the method's own rule, else 1e-4)")
    group.add_argument("--scale_lr", action="store_true",
                       help="multiply the learning rate by batch size x processes x accumulation steps")
    group.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS,
                       help="learning-rate schedule (diffusers.optimization.get_scheduler)")
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="linear warm-up steps")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    group.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    group.add_argument("--use_8bit_adam", action="store_true", help="8-bit AdamW from bitsandbytes")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    group.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="clip the gradient norm to this value (0 disables clipping)")


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("precision and memory")
    group.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                       help="base weights in fp16/bf16, trainable parameters kept in fp32 (default: "
                            "accelerate's setting, 'no' without one); the VAE always runs in fp32")
    group.add_argument("--allow_tf32", action="store_true", help="allow TF32 matmuls on Ampere+ GPUs")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention instead of PyTorch SDPA (the default)")
    group.add_argument("--quantize_base", choices=tuple(QUANTIZATION_BACKENDS),
                       help="load the frozen denoiser weights in 8-bit or 4-bit (NF4) through bitsandbytes "
                            f"(CUDA; --adapter {'/'.join(_quantizable_methods())} only: the others need the "
                            "dense base weights)")


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("noise and loss")
    scope, default = flag_families, flag_defaults  # the families each flag applies to, its default on each
    group.add_argument("--noise_offset", type=float, default=0.0,
                       help="offset noise: add this times a per-channel constant to the noise")
    group.add_argument("--snr_gamma", type=float,
                       help=f"{scope('snr_gamma')}: Min-SNR loss weighting with this gamma (5.0 is the "
                            "paper's value)")
    group.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES,
                       help=f"{scope('weighting_scheme')}: timestep density and loss weighting (default: "
                            f"{default('weighting_scheme')}, as diffusers' DreamBooth scripts)")
    group.add_argument("--logit_mean", type=float,
                       help=f"{scope('logit_mean')} logit_normal: mean (default: {default('logit_mean')})")
    group.add_argument("--logit_std", type=float,
                       help=f"{scope('logit_std')} logit_normal: standard deviation (default: "
                            f"{default('logit_std')})")
    group.add_argument("--mode_scale", type=float,
                       help=f"{scope('mode_scale')} mode weighting: scale (default: {default('mode_scale')})")
    group.add_argument("--precondition_outputs", action="store_true", default=None,
                       help=f"{scope('precondition_outputs')}: precondition the prediction to x0 as in SD3's "
                            "full fine-tuning script")
    group.add_argument("--guidance_scale", type=float,
                       help=f"{scope('guidance_scale')}: value of the guidance embedding during training "
                            f"(default: {default('guidance_scale')}; ignored by models without one, e.g. "
                            "FLUX.1-schnell)")
    group.add_argument("--max_sequence_length", type=int,
                       help=f"{scope('max_sequence_length')}: prompt tokens (T5's on Flux, the language "
                            "model's on the others; default: "
                            f"{default('max_sequence_length')}, at most 512)")


def add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument("--validation_prompt",
                       help="prompt sampled every --validation_steps (default: none during training; the "
                            "final samples then use the instance prompt)")
    group.add_argument("--num_validation_images", type=int, default=4, help="images per validation")
    group.add_argument("--validation_steps", type=int, default=100, help="validate every N optimizer steps")
    group.add_argument("--validation_inference_steps", type=int, default=25, help="sampler steps")
    group.add_argument("--validation_guidance_scale", type=float,
                       help="classifier-free guidance (default: the pipeline's own)")
    group.add_argument("--skip_final_inference", action="store_true",
                       help="do not reload the saved adapter into a fresh pipeline for final samples")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--output_dir", default="outputs/subject",
                       help="where the adapter, checkpoints, samples, logs and model card go")
    group.add_argument("--checkpointing_steps", type=int, default=500,
                       help="save a resumable checkpoint every N optimizer steps")
    group.add_argument("--checkpoints_total_limit", type=int,
                       help="keep at most this many checkpoints (oldest removed)")
    group.add_argument("--resume_from_checkpoint",
                       help="a checkpoint folder, or 'latest' for the newest one in --output_dir "
                            "(starts fresh when there is none)")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("logging")
    group.add_argument("--report_to", default="tensorboard", choices=REPORT_TO,
                       help="experiment tracker for losses and images")
    group.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    group.add_argument("--tracker_project_name", default="difftune-subject", help="tracker run name")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Every shared group after the model and data ones: adapter (with each method's
    options), optimization, precision, loss, validation, checkpoints, logging."""
    add_adapter_arguments(parser)
    add_optimization_arguments(parser)
    add_precision_arguments(parser)
    add_loss_arguments(parser)
    add_validation_arguments(parser)
    add_checkpoint_arguments(parser)
    add_logging_arguments(parser)


def check_family_flags(args: argparse.Namespace, family: str) -> None:
    """Refuse flags that do not apply to the model family (a name): another noise process's (flow
    matching vs DDPM) or another family's own (Flux's guidance embedding and T5 length)."""
    check_flags(get_family(family), vars(args))


def check_optimizer_arguments(args: argparse.Namespace) -> None:
    """AdamW's own ranges, checked here so a bad value fails before the model loads (torch checks
    them only when the optimizer is built, after loading, with a traceback)."""
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name, None)
        if value is not None and not 0.0 <= value < 1.0:
            raise DifftuneError(f"--{name} must be in [0, 1), got {value}")
    epsilon = getattr(args, "adam_epsilon", None)
    if epsilon is not None and epsilon <= 0:
        raise DifftuneError(f"--adam_epsilon must be positive, got {epsilon}")
    decay = getattr(args, "adam_weight_decay", None)
    if decay is not None and decay < 0:
        raise DifftuneError(f"--adam_weight_decay must not be negative, got {decay}")
    if getattr(args, "lr_num_cycles", None) is not None and args.lr_num_cycles < 1:
        raise DifftuneError(f"--lr_num_cycles must be at least 1, got {args.lr_num_cycles}")


def check_common_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range values and missing optional packages before any loading."""
    import importlib.util

    import torch

    check_finite_numbers(args)
    positive = ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps",
                "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
                "num_validation_images", "validation_inference_steps")
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise DifftuneError(f"--{name} must be at least 1, got {value}")
    for name in ("noise_offset", "max_grad_norm", "lr_warmup_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise DifftuneError(f"--{name} must not be negative, got {value}")
    if getattr(args, "snr_gamma", None) is not None and args.snr_gamma <= 0:
        raise DifftuneError(f"--snr_gamma must be positive, got {args.snr_gamma}")
    if args.learning_rate is not None and not 0 < args.learning_rate <= MAX_LEARNING_RATE:
        raise DifftuneError(f"--learning_rate must be in (0, {MAX_LEARNING_RATE:g}] (AdamW moves every "
                            f"parameter by about this much per step), got {args.learning_rate}")
    check_optimizer_arguments(args)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DifftuneError("--mixed_precision fp16 needs a CUDA GPU (PyTorch has no fp16 autocast with "
                            "gradient scaling on CPU); use --mixed_precision bf16 on CPU")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise DifftuneError("--enable_xformers_memory_efficient_attention needs xformers, which is not "
                            "installed: pip install 'difftune[xformers]' (GPU only), or drop the flag to "
                            "use PyTorch's SDPA attention")
    check_quantized_base(args)
    length = getattr(args, "max_sequence_length", None)
    if length is not None and not 1 <= length <= 512:
        raise DifftuneError(f"--max_sequence_length must be in [1, 512] (FLUX.1's T5 limit), got {length}")
    if getattr(args, "offload", False) and not torch.cuda.is_available():
        raise DifftuneError("--offload moves the VAE and text encoders between CPU and GPU memory; there is "
                            "no CUDA GPU here (on the CPU they already share one memory): drop the flag")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise DifftuneError("--use_8bit_adam needs bitsandbytes, which is not installed: "
                            "pip install bitsandbytes (CUDA GPU), or drop the flag")


def check_quantized_base(args: argparse.Namespace) -> None:
    """``--quantize_base``: refused for methods that need the dense base weight (whatever is
    installed; `Adapter.quantized_base_refusal`), then a clear error when bitsandbytes is missing."""
    import importlib.util

    bits = getattr(args, "quantize_base", None)
    if bits is None:
        return
    method = getattr(args, "adapter", None)
    refusal = get_method(method).quantized_base_refusal
    if refusal:
        able = ", ".join(_quantizable_methods())
        raise DifftuneError(f"--quantize_base {bits} cannot be used with --adapter {method}: {refusal} "
                            f"(--quantize_base supports --adapter {able})")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DifftuneError(f"--quantize_base {bits} needs bitsandbytes, which is not installed: "
                            "pip install bitsandbytes (CUDA GPU), or drop the flag")
    model = getattr(args, "pretrained_model_name_or_path", "") or ""
    if model.startswith("builtin:"):
        raise DifftuneError(f"--quantize_base loads hub or folder models through diffusers; {model} is "
                            "built in memory")


def add_pivotal_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pivotal tuning (new identifier tokens)")
    group.add_argument("--train_token_embedding", action="store_true",
                       help="give the identifier new tokens whose embeddings train with the adapter "
                            "(pivotal tuning); saved in the adapter file "
                            f"({', '.join(f.title for f in FAMILIES.values() if f.trainable_text_encoders)})")
    group.add_argument("--identifier", default=pivotal.DEFAULTS["identifier"],
                       help="the identifier word of the instance prompt that becomes the new tokens")
    group.add_argument("--num_new_tokens", type=int, default=pivotal.DEFAULTS["num_new_tokens"],
                       help="tokens the identifier becomes (diffusers' multi-vector names: sks, sks_1, ...)")
    group.add_argument("--token_embedding_lr", type=float, default=pivotal.DEFAULTS["token_embedding_lr"],
                       help="learning rate of the new token embeddings (1e-2 measured best of 1e-3, 1e-2, "
                            "3e-2 on builtin:embedded)")
    group.add_argument("--token_embedding_init", default=pivotal.DEFAULTS["token_embedding_init"],
                       help="'random' (normal, at the mean norm of the vocabulary's embeddings) or a word "
                            "whose embedding every new token starts from (e.g. the class word)")
    group.add_argument("--token_embedding_max_norm", type=float,
                       help="cap on each new embedding's norm, in multiples of the vocabulary's mean norm "
                            "(default: none)")


def check_pivotal_arguments(args: argparse.Namespace) -> None:
    """Flag checks that need no model (bad input fails in seconds)."""
    given = [f"--{n}" for n, default in pivotal.DEFAULTS.items() if getattr(args, n) != default]
    given += ["--token_embedding_max_norm"] if args.token_embedding_max_norm is not None else []
    if not args.train_token_embedding:
        if given:
            raise DifftuneError(f"{' and '.join(given)} given without --train_token_embedding")
        return
    if args.num_new_tokens < 1:
        raise DifftuneError(f"--num_new_tokens must be at least 1, got {args.num_new_tokens}")
    if args.token_embedding_max_norm is not None and not args.token_embedding_max_norm > 0:
        raise DifftuneError("--token_embedding_max_norm must be positive, got "
                            f"{args.token_embedding_max_norm}")
    if not args.token_embedding_lr > 0:
        raise DifftuneError(f"--token_embedding_lr must be positive, got {args.token_embedding_lr}")
    if not re.fullmatch(r"[a-z][a-z0-9]*", args.identifier):
        raise DifftuneError(f"--identifier must be one lowercase word, got {args.identifier!r}")
    if not re.search(rf"\b{args.identifier}\b", args.instance_prompt or ""):
        raise DifftuneError(f"--identifier {args.identifier!r} does not occur in --instance_prompt "
                            f"{args.instance_prompt!r}")
    if args.pre_compute_text_embeddings:
        raise DifftuneError("--pre_compute_text_embeddings cannot be used with --train_token_embedding: the "
                            "new tokens' embeddings change every step")
    for flag in ("resume_from_checkpoint", "init_adapter"):
        if getattr(args, flag, None):
            raise DifftuneError(f"--train_token_embedding cannot be combined with --{flag} yet")
    if getattr(args, "export", None):
        raise DifftuneError("--train_token_embedding: --export cannot carry the new token embeddings "
                            "(kohya / diffusers LoRA files have no place for them); export without it")
