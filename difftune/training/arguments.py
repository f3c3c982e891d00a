"""Command-line and config-file options for the training scripts.

Every trainer flag is defined once, as a field of a dataclass, and the parsers are built from
those fields:

* `add_settings_arguments` turns settings dataclasses (training/settings.py, `LossOptions` of the
  model families, a trainer's own data settings) into flags, from each field's
  ``option(default, help, choices=..., check=...)`` (`difftune.options`); `settings_from_args`
  builds the settings back from the parsed flags, and `difftune.options.check_values` runs the
  fields' checks. The ``add_*_arguments`` functions below say which classes' flags each section
  of a trainer lists.
* `add_method_arguments` turns each registered method's config dataclass into flags the same
  way. Fields that several methods share by name (``rank``, ``alpha``) become plain flags
  (``--rank``); the rest are prefixed with the method (``--lora_dropout``, ``--sara_threshold``).
  A method that registers gets its flags without touching any script.
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
from ..families import LossOptions, check_flags, flag_defaults, flag_families, get_family
from ..io import read_text
from ..options import (
    argument_type,
    check_finite_numbers,
    check_values,
    is_option,
    option_choices,
    option_help,
)
from ..paths import portable_path
from ..tuners import METHODS, Adapter, get_method
from . import pivotal
from .settings import (
    EXPORT_GROUP,
    AcceleratorSettings,
    AdapterFiles,
    AdapterSettings,
    CheckpointSettings,
    MemorySettings,
    ModelSettings,
    OptimizerSettings,
    ValidationSettings,
    quantizable_methods,
)

# Field names that mean the same thing across methods: one flag, no method prefix.
SHARED_OPTION_NAMES = ("rank", "alpha")
# Extra spellings users know from diffusers' scripts, keyed by destination.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"alpha": ("--lora_alpha",), "lora_use_dora": ("--use_dora",)}
# Fields the trainer exposes itself (``--targets``), not per method.
TRAINER_LEVEL_FIELDS = ("targets",)
METHOD_GROUP_TITLE = "adapter method options"


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
            action = group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                                        default=None, help=help_text)
        elif typing.get_origin(annotation) in (list, tuple):
            (item,) = typing.get_args(annotation)[:1]
            action = group.add_argument(*names, dest=dest, nargs="+", type=_value_parser(item), default=None,
                                        help=help_text)
        else:
            choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
            action = group.add_argument(*names, dest=dest, type=_value_parser(annotation), choices=choices,
                                        default=None, metavar=dest.upper(), help=help_text)
        action.option_owner = Adapter  # generated from the registered methods' configs
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


def _flag_parser(field: dataclasses.Field, annotation: Any):
    """The ``type=`` of a field's flag: its ``parse`` function, else what its annotation asks for."""
    parse = field.metadata.get("parse")
    return _value_parser(annotation) if parse is None else argument_type(parse)


def _add_field_flag(group: Any, dest: str, field: dataclasses.Field, annotation: Any, default: Any,
                    help_text: str, switches: bool = False) -> argparse.Action:
    """One flag from one option field (`difftune.options.option`): its type, choices, default and help.

    A bool field is a switch: ``--flag`` (store_true) when it defaults to False, else ``--flag /
    --no-flag`` (as for every bool with ``switches``); a list field takes one or more values (each time
    it is given, with ``repeat``); a path is given as text.
    """
    annotation = _without_none(annotation)
    annotation = str if annotation is Path else annotation
    literal = typing.get_origin(annotation) is typing.Literal
    choices = option_choices(field) or (list(typing.get_args(annotation)) if literal else None)
    kwargs: dict[str, Any] = {"dest": dest, "default": default, "help": help_text.replace("%", "%%")}
    if "metavar" in field.metadata:
        kwargs["metavar"] = field.metadata["metavar"]
    if annotation is bool:
        kwargs["action"] = ("store_true" if default is False and not switches
                            else argparse.BooleanOptionalAction)
    elif typing.get_origin(annotation) in (list, tuple):
        (item,) = typing.get_args(annotation)[:1]
        kwargs.update(nargs="+", type=_flag_parser(field, item), choices=choices)
        if field.metadata.get("repeat"):
            kwargs["action"] = "extend"
    else:
        kwargs.update(type=_flag_parser(field, annotation), choices=choices)
    action = group.add_argument(f"--{dest}", *field.metadata.get("aliases", ()), **kwargs)
    action.option_field = field  # what the flag is generated from (tests check that nothing else is)
    return action


def _argument_group(parser: argparse.ArgumentParser, title: str, description: str | None = None) -> Any:
    """The parser's group of this title, made on first use (flags of several classes may share one)."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title, description)


def add_settings_arguments(parser: argparse.ArgumentParser, *settings_classes: type, title: str | None = None,
                           description: str | None = None) -> list[str]:
    """The flags of settings dataclasses (training/settings.py, a trainer's own): one ``--<field>`` per
    field made with `difftune.options.option` whose group is ``title`` (default: the first class's
    ``flag_group``), in the order of the classes and their fields. Returns the dests.

    A flag that only some model families take (a family's `applicable_flags`) says which, and, where
    they have their own defaults (`ModelFamily.option_defaults`), what those are: the families own
    that part of the help.
    """
    title = title or settings_classes[0].flag_group
    group = _argument_group(parser, title, description)
    dests = []
    for settings_class in settings_classes:
        hints = typing.get_type_hints(settings_class)
        for field in dataclasses.fields(settings_class):
            if not is_option(field) or field.metadata.get("group", settings_class.flag_group) != title:
                continue
            help_text = option_help(field)
            scope, family_defaults = flag_families(field.name), flag_defaults(field.name)
            if scope:
                help_text = f"{scope}: {help_text}"
            if family_defaults and "default" not in help_text:
                help_text += f" (default: {family_defaults})"
            default = _default_of(field)
            action = _add_field_flag(group, field.name, field, hints[field.name], default, help_text)
            action.option_owner = settings_class
            dests.append(field.name)
    return dests


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
        default, dest = _default_of(field), prefix + field.name
        help_text = option_help(field)
        if "default" not in help_text:
            help_text += f" (default: {default})"
        action = _add_field_flag(group, dest, field, hints[field.name], default, help_text, switches=True)
        action.option_owner = config_class
        dests.append(dest)
    return dests


def dataclass_from_args(args: argparse.Namespace, config_class: type, prefix: str = "") -> Any:
    """The options dataclass filled from flags made by `add_dataclass_arguments`."""
    return config_class(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(config_class)})


def settings_from_args(args: argparse.Namespace, settings_class: type, skip_none: bool = False,
                       partial: bool = False) -> Any:
    """A settings dataclass from the flags of the same names (made from its fields by
    `add_settings_arguments`, or, for a plain field, by another class's).

    Every field must have its flag: a field the parser lacks is a programming error, raised here
    rather than silently left at its default. With ``partial`` such a field keeps its default (a
    trainer that takes only some of a class's flags: the one-step trainer has no noise and loss flags
    but ``--prediction_type``); with ``skip_none`` so does a flag left unset (None), for settings
    whose defaults depend on what the flag would apply to.
    """
    values = {}
    for field in dataclasses.fields(settings_class):
        if not field.init:
            continue
        if hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)
        elif not partial:
            raise TypeError(f"{settings_class.__name__}.{field.name}: the parser has no --{field.name} flag "
                            f"(make it with add_settings_arguments)")
    if skip_none:
        values = {name: value for name, value in values.items() if value is not None}
    return settings_class(**values)


def adapter_spec(args: argparse.Namespace) -> AdapterSpec:
    """The trained adapter (``--adapter``, ``--targets`` and the method's flags) as one spec, its
    options checked once here."""
    chosen = settings_from_args(args, AdapterSettings)
    return AdapterSpec(chosen.adapter, chosen.targets, adapter_options(args, chosen.adapter))


def base_adapters(args: argparse.Namespace) -> list[tuple[str, float]]:
    """``--base_adapter`` as (path, weight) pairs."""
    return settings_from_args(args, AdapterSettings).base_adapters


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
    text = read_text(path, "--config")
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


# --- --help -------------------------------------------------------------------------------

def _default_text(action: argparse.Action) -> str | None:
    """What ``--help`` says a flag's default is; None where its help already says it (or it is required)."""
    text = (action.help or "").lower()
    if "default" in text or "required" in text or action.default is argparse.SUPPRESS:
        return None
    default = action.default
    if isinstance(default, bool) or (default is None and action.nargs == 0):
        return "on" if default else "off"
    if default is None or default == []:
        return "none"
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(portable_path(default))  # a shipped file as assets/..., not this checkout's path


def recipe_notes(recipes: dict[str, dict[str, dict[str, Any]]]) -> dict[str, str]:
    """``{dest: "builtin:embedded recipe: lora, tlora 0.001; sara, svfit 0.003"}`` for every flag a
    recipe fills when it is left unset (a value all of a model's methods share is given once)."""
    values: dict[str, dict[str, dict[str, list[str]]]] = {}
    for model, methods in recipes.items():
        for method, recipe in methods.items():
            for dest, value in recipe.items():
                shown = (" ".join(map(str, value)) if isinstance(value, list) else
                         ("on" if value else "off") if isinstance(value, bool) else str(portable_path(value)))
                values.setdefault(dest, {}).setdefault(model, {}).setdefault(shown, []).append(method)
    notes = {}
    for dest, models in values.items():
        parts = []
        for model, by_value in models.items():
            every = len(by_value) == 1 and len(next(iter(by_value.values()))) == len(recipes[model])
            shown = (next(iter(by_value)) + " (every method)" if every else
                     "; ".join(f"{', '.join(methods)} {value}" for value, methods in by_value.items()))
            parts.append(f"{model} recipe: {shown}")
        notes[dest] = "; ".join(parts)
    return notes


def help_formatter(recipes: dict[str, dict[str, dict[str, Any]]] | None = None
                   ) -> type[argparse.HelpFormatter]:
    """A ``--help`` formatter (the description kept as written) that gives every flag its default and,
    for the flags a base model's recipe fills when left unset, the recipe's values (`recipe_notes`)."""
    notes = recipe_notes(recipes or {})

    class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str:
            help_text = action.help or ""
            default = _default_text(action)
            if default is not None:
                help_text += f" (default: {default.replace('%', '%%')})"
            if action.dest in notes:
                help_text += f" [{notes[action.dest].replace('%', '%%')}]"
            return help_text

    return DefaultsHelpFormatter


def trainer_parser(description: str | None, recipes: dict[str, dict[str, dict[str, Any]]] | None = None
                   ) -> argparse.ArgumentParser:
    """A trainer's parser (`help_formatter` with the trainer's recipes), its first group ``--config``
    (a YAML or JSON file of its flags)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=help_formatter(recipes))
    parser.add_argument_group("config file").add_argument(
        "--config", help="YAML or JSON file of options (keys are flag names without dashes); flags on the "
                         "command line override it")
    return parser


def parse_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[argparse.Namespace,
                                                                                       set[str]]:
    """Parse ``--config`` and the command line; returns the flags and the ones actually given (what a
    recipe or preset must not override)."""
    from .recipes import given_destinations

    tokens = command_tokens(parser, argv)
    return parser.parse_args(tokens), given_destinations(parser, tokens)


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
# Every flag is a field of a settings dataclass (training/settings.py; the noise and loss flags are
# `LossOptions`' fields, owned by the model families): these functions only say which classes'
# flags each trainer lists, and where.

# the settings whose flags both trainers share, checked by `check_common_arguments`
SHARED_SETTINGS = (ModelSettings, AdapterSettings, OptimizerSettings, MemorySettings, AcceleratorSettings,
                   LossOptions, ValidationSettings, CheckpointSettings)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, ModelSettings)


def add_adapter_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, AdapterSettings)
    add_method_arguments(parser)


def add_optimization_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, OptimizerSettings, MemorySettings, title="optimization")


def add_precision_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, AcceleratorSettings, MemorySettings, ModelSettings,
                           title="precision and memory")


def add_loss_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, LossOptions)


def add_validation_arguments(parser: argparse.ArgumentParser,
                             validation: type[ValidationSettings] = ValidationSettings) -> None:
    """The validation flags of ``validation`` (the dataset trainer's takes several prompts)."""
    add_settings_arguments(parser, validation)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, CheckpointSettings)


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, AcceleratorSettings, title="logging")


def add_training_arguments(parser: argparse.ArgumentParser,
                           validation: type[ValidationSettings] = ValidationSettings) -> None:
    """Every shared group after the model and data ones: adapter (with each method's
    options), optimization, precision, loss, validation (``validation``'s flags), checkpoints, logging."""
    add_adapter_arguments(parser)
    add_optimization_arguments(parser)
    add_precision_arguments(parser)
    add_loss_arguments(parser)
    add_validation_arguments(parser, validation)
    add_checkpoint_arguments(parser)
    add_logging_arguments(parser)


def add_adapter_file_arguments(parser: argparse.ArgumentParser) -> None:
    """``--init_adapter`` in its group, then the ``--export`` flags in theirs (`AdapterFiles`)."""
    add_settings_arguments(parser, AdapterFiles)
    add_settings_arguments(parser, AdapterFiles, title=EXPORT_GROUP)


def check_init_adapter(args: argparse.Namespace) -> None:
    """--init_adapter: a readable file of the --adapter method (another tool's file: a LoRA)."""
    from ..adapter_file import TOKEN_EMBEDDINGS, resolve_adapter_path
    from ..api import read_adapter_info
    from ..lora_import import is_foreign_file

    path = resolve_adapter_path(args.init_adapter)
    info = {"method": "lora"} if is_foreign_file(path) else read_adapter_info(path)
    if info["method"] != args.adapter:
        raise DifftuneError(f"--init_adapter {path} holds a {info['method']} adapter, "
                            f"but --adapter is {args.adapter}")
    if getattr(args, "train_text_encoder", False):
        raise DifftuneError("--init_adapter cannot be combined with --train_text_encoder yet")
    if TOKEN_EMBEDDINGS in info:
        raise DifftuneError(f"--init_adapter {path} carries new token embeddings (pivotal tuning); "
                            "training on from such a file is not supported yet")


def check_export_arguments(args: argparse.Namespace, spec: AdapterSpec, family: str) -> None:
    """--export formats the model family and the method can be written in, before training."""
    from ..export import LORA_FORMATS, check_export_options

    for fmt in args.export:
        check_export_options(args.adapter, spec.config.to_dict(), family, fmt,
                             args.export_rank if fmt in LORA_FORMATS else None,
                             args.export_energy if fmt in LORA_FORMATS else None)
    extraction = args.export_rank is not None or args.export_energy is not None
    if extraction and not set(args.export) & set(LORA_FORMATS):
        raise DifftuneError("--export_rank/--export_energy apply to --export kohya or comfyui")


def check_family_flags(args: argparse.Namespace, family: str) -> None:
    """Refuse flags that do not apply to the model family (a name): another noise process's (flow
    matching vs DDPM) or another family's own (Flux's guidance embedding and T5 length)."""
    check_flags(get_family(family), vars(args))


def check_common_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range values and missing optional packages before any loading: nan and inf in
    any number flag, then each shared flag's own check (`SHARED_SETTINGS`' fields), then what this
    machine lacks."""
    import importlib.util

    import torch

    check_finite_numbers(args)
    check_values(args, *SHARED_SETTINGS)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise DifftuneError("--mixed_precision fp16 needs a CUDA GPU (PyTorch has no fp16 autocast with "
                            "gradient scaling on CPU); use --mixed_precision bf16 on CPU")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise DifftuneError("--enable_xformers_memory_efficient_attention needs xformers, which is not "
                            "installed: pip install 'difftune[xformers]' (GPU only), or drop the flag to "
                            "use PyTorch's SDPA attention")
    check_quantized_base(args)
    check_compile_backend(args)
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise DifftuneError("--use_8bit_adam needs bitsandbytes, which is not installed: "
                            "pip install bitsandbytes (CUDA GPU), or drop the flag")


def check_compile_backend(args: argparse.Namespace) -> None:
    """``--compile_backend`` names a backend torch.compile has (checked before any model loads)."""
    backend = getattr(args, "compile_backend", "inductor")
    if not getattr(args, "compile", False) or backend == "inductor":
        return
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise DifftuneError(f"--compile_backend {backend!r} is not a torch.compile backend; choose one of "
                            f"{', '.join(sorted(known))}")


def check_quantized_base(args: argparse.Namespace) -> None:
    """``--quantize_base``: refused for methods that need the dense base weight (whatever is
    installed; `Adapter.quantized_base_refusal`), then what loading through bitsandbytes needs."""
    check_quantized_text_encoder(args)
    bits = getattr(args, "quantize_base", None)
    if bits is None:
        return
    method = getattr(args, "adapter", None)
    refusal = get_method(method).quantized_base_refusal
    if refusal:
        able = ", ".join(quantizable_methods())
        raise DifftuneError(f"--quantize_base {bits} cannot be used with --adapter {method}: {refusal} "
                            f"(--quantize_base supports --adapter {able})")
    check_bitsandbytes_loading(args, "--quantize_base", bits)


def check_quantized_text_encoder(args: argparse.Namespace) -> None:
    """``--quantize_text_encoder``: the text encoders stay frozen, diffusers loads one bitsandbytes
    setting per pipeline, and loading through bitsandbytes needs what `check_bitsandbytes_loading` says."""
    bits = getattr(args, "quantize_text_encoder", None)
    if bits is None:
        return
    for flag in ("train_text_encoder", "train_token_embedding"):
        if getattr(args, flag, False):
            raise DifftuneError(f"--quantize_text_encoder {bits} cannot be used with --{flag}: a quantised "
                                "text encoder stays frozen")
    base_bits = getattr(args, "quantize_base", None)
    if base_bits not in (None, bits):
        raise DifftuneError(f"--quantize_text_encoder {bits} and --quantize_base {base_bits}: give both the "
                            "same value (diffusers loads a pipeline with one bitsandbytes setting)")
    check_bitsandbytes_loading(args, "--quantize_text_encoder", bits)


def check_bitsandbytes_loading(args: argparse.Namespace, flag: str, bits: str) -> None:
    """A quantising ``flag``: bitsandbytes installed, and a model diffusers loads (not a built-in one)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise DifftuneError(f"{flag} {bits} needs bitsandbytes, which is not installed: "
                            "pip install bitsandbytes (CUDA GPU), or drop the flag")
    model = getattr(args, "pretrained_model_name_or_path", "") or ""
    if model.startswith("builtin:"):
        raise DifftuneError(f"{flag} loads hub or folder models through diffusers; {model} is built in "
                            "memory")


def add_pivotal_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, pivotal.TokenEmbeddingSettings)


def check_pivotal_arguments(args: argparse.Namespace) -> None:
    """Flag checks that need no model (bad input fails in seconds)."""
    settings = pivotal.TokenEmbeddingSettings
    given = [f"--{f.name}" for f in dataclasses.fields(settings)
             if f.name != "train_token_embedding" and getattr(args, f.name) != f.default]
    if not args.train_token_embedding:
        if given:
            raise DifftuneError(f"{' and '.join(given)} given without --train_token_embedding")
        return
    check_values(args, settings)
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
