"""Command-line options shared by difftune's commands: option fields of the dataclasses that become
flags (adapter configs, HiPA's options, the trainers' settings), the rules their values must follow,
the precision names of the dtype flags, and the check that every number flag is finite.

Neutral ground: the tuners, the model families, the HiPA objective, the trainers and the evaluation
all use them, and none should import another for it.

A field made with `option` is one flag, defined once: its default, help, choices, the `Check` its
value must pass and, for a value given as text that names something (``builtin:heart``), the
function that reads it. ``training/arguments.py`` builds the argparse flags from such fields, and
`check_values` runs their checks on parsed flags or on a dataclass built in code alike.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from .errors import DifftuneError

# Precision names of the flags (--mixed_precision, --prior_generation_precision, --dtype, ...) as
# torch dtypes; "no" is accelerate's name for full precision.
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


Choices = Sequence[Any] | Callable[[], Sequence[Any]]


def option(default: Any, help: str | Callable[[], str], *, choices: Choices | None = None,
           check: Check | None = None, parse: Callable[[str], Any] | None = None, group: str | None = None,
           metavar: str | None = None, aliases: Sequence[str] = (), repeat: bool = False,
           **kwargs: Any) -> Any:
    """A dataclass field that is also a command-line flag: its default and help, and optionally

    * ``choices``: the values it takes (or a function giving them when the parser is built, for a
      registry's names); a ``Literal`` annotation gives them too;
    * ``check``: the `Check` its value must pass (the trainer runs it before loading anything);
    * ``parse``: reads the flag's text into the value (a `DifftuneError` becomes argparse's error);
    * ``group``: the help section it is listed in, when not its dataclass's ``flag_group``;
    * ``metavar``: the placeholder of its value in the usage line;
    * ``aliases``: further spellings of the flag that other tools' users know (``--min_bucket_reso``);
    * ``repeat``: a list flag that may be given several times, each adding its values.

    ``help`` may be a function, called when the parser is built (text naming registered models).
    """
    metadata: dict[str, Any] = {"help": help}
    extras = {"choices": choices, "check": check, "parse": parse, "group": group, "metavar": metavar,
              "aliases": tuple(aliases) or None, "repeat": repeat or None}
    metadata.update({key: value for key, value in extras.items() if value is not None})
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse ``type=``: its `DifftuneError` becomes argparse's one-line error about
    the flag (a plain ValueError would only say "invalid value")."""
    def parse_text(text: str) -> Any:
        try:
            return parse(text)
        except DifftuneError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse_text.__name__ = parse.__name__
    return parse_text


def is_option(field: dataclasses.Field) -> bool:
    """Whether a dataclass field was made by `option` (a flag); a plain field is filled from a flag of
    the same name that another settings class defines."""
    return "help" in field.metadata


def option_help(field: dataclasses.Field) -> str:
    text = field.metadata.get("help", field.name)
    return text() if callable(text) else text


def option_choices(field: dataclasses.Field) -> list[Any] | None:
    choices = field.metadata.get("choices")
    if callable(choices):
        choices = choices()
    return None if choices is None else list(choices)


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule a flag's value must follow: ``test(value)`` is true for a good value, and ``rule``
    says what is expected, as the error puts it (``--max_train_steps must be at least 1, got 0``).
    None (a flag not given) always passes."""

    test: Callable[[Any], bool]
    rule: str

    def __call__(self, name: str, value: Any) -> None:
        if value is not None and not self.test(value):
            raise DifftuneError(f"--{name} {self.rule}, got {value!r}")


def at_least(low: int) -> Check:
    return Check(lambda value: value >= low, f"must be at least {low}")


def positive() -> Check:
    return Check(lambda value: value > 0, "must be positive")


def non_negative() -> Check:
    return Check(lambda value: value >= 0, "must not be negative")


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
             why: str = "") -> Check:
    """``[low, high]``, either end open; ``why`` (a parenthesis) says where the bounds come from."""
    def test(value: float) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Check(test, f"must be in {interval}" + (f" ({why})" if why else ""))


def multiple_of(step: int) -> Check:
    return Check(lambda value: value >= step and value % step == 0, f"must be a positive multiple of {step}")


def matches(pattern: str, words: str) -> Check:
    """A text flag matching ``pattern`` as a whole; ``words`` says what that means (``one lowercase
    word``)."""
    return Check(lambda value: re.fullmatch(pattern, value) is not None, f"must be {words}")


def check_values(values: Mapping[str, Any] | Any, *classes: type, prefix: str = "") -> None:
    """Run the `Check` of every option field of ``classes`` on its value in ``values`` (a mapping,
    parsed flags, or a settings object); a field ``values`` has no value for is skipped."""
    mapping = values if isinstance(values, Mapping) else vars(values)
    for settings_class in classes:
        for field in dataclasses.fields(settings_class):
            check = field.metadata.get("check")
            if check is not None:
                check(prefix + field.name, mapping.get(prefix + field.name))


class CheckedSettings:
    """A dataclass of option fields whose checks run when an object is made (``__post_init__``): settings
    built in code pass the same checks as the flags. ``flag_group`` titles the section of ``--help``
    that lists its flags (a field's ``group`` may name another)."""

    flag_group: ClassVar[str] = "options"

    def __post_init__(self) -> None:
        check_values(self, type(self))


def check_finite_numbers(args: argparse.Namespace) -> None:
    """Refuse nan and inf in every number flag: Python's float() accepts them, and a NaN passes
    every ``value <= 0`` check and would only show as a NaN loss (or adapter) much later."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise DifftuneError(f"--{name} must be a finite number, got {item}")
