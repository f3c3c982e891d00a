"""Command-line options shared by difftune's commands: option fields of the dataclasses that become
flags (adapter configs, HiPA's options), the precision names of the dtype flags, and the check that
every number flag is finite.

Neutral ground: the tuners, the HiPA objective, the trainers and the evaluation all use them, and
none should import another for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from .errors import DifftuneError

# Precision names of the flags (--mixed_precision, --prior_generation_precision, --dtype, ...) as
# torch dtypes; "no" is accelerate's name for full precision.
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text; the trainer turns each into a CLI flag."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


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


def check_finite_numbers(args: argparse.Namespace) -> None:
    """Refuse nan and inf in every number flag: Python's float() accepts them, and a NaN passes
    every ``value <= 0`` check and would only show as a NaN loss (or adapter) much later."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise DifftuneError(f"--{name} must be a finite number, got {item}")
