"""Option fields of the dataclasses that become command-line flags (adapter configs, HiPA's options).

Neutral ground: the tuners and the HiPA objective both declare their options this way, and
neither should import the other for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its help text; the trainer turns each into a CLI flag."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
