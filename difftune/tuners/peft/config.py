"""Options of the ``peft`` method: which peft tuner, its rank and alpha, and any other field of its config."""

from __future__ import annotations

import ast
import dataclasses
import json
from typing import Any

from ...errors import DifftuneError
from ...options import option
from ..base import AdapterConfig
from . import catalog


@dataclasses.dataclass
class PeftMethodConfig(AdapterConfig):
    """Any layer tuner of the installed peft (LoHa, LoKr, OFT, BOFT, HRA, DoRA, SHiRA, Super-Tuning, ...).

    ``rank`` and ``alpha`` map to the tuner config's ``r`` and ``alpha``/``lora_alpha``; unset, peft's
    own defaults apply. ``options`` holds the tuner's other fields, as a dict or its JSON text (the
    ``--peft_options`` flag), e.g. ``{"decompose_both": true}`` for LoKr or ``{"sparsity": 0.999,
    "select_top": false}`` for Super-Tuning.
    """

    targets: str | list[str] = option("attn", "layers to adapt (preset, regex or list)")
    type: str = option("loha", "the peft tuner: loha, lokr, oft, boft, hra, dora, lora, shira, supertuning, "
                               "... (any tuner of the installed peft that wraps Linear/Conv2d layers)")
    rank: int | None = option(None, "the tuner config's rank r (default: peft's for the type; for OFT "
                                    "the number of blocks)")
    alpha: float | None = option(None, "the tuner config's alpha or lora_alpha (default: peft's)")
    options: dict | str = option({}, "further fields of the tuner's peft config, as JSON, e.g. "
                                     "'{\"decompose_both\": true}' (default: none)")

    def validate(self) -> None:
        self.type = str(self.type).lower()
        self.options = parse_options(self.options)
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise DifftuneError(f"peft option 'rank' must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not self.alpha > 0):
            raise DifftuneError(f"peft option 'alpha' must be positive, got {self.alpha!r}")
        self.peft_config()  # peft's own checks of every value, before any model is touched

    def peft_kwargs(self) -> dict[str, Any]:
        return catalog.peft_kwargs(self.type, self.rank, self.alpha, self.options)

    def peft_config(self, target_modules: Any = None) -> Any:
        """The peft config object these options describe (``target_modules`` as peft takes it)."""
        return catalog.build_peft_config(self.type, self.peft_kwargs(), target_modules)


def parse_options(value: Any) -> dict[str, Any]:
    """``options`` as a dict: a dict as is, or text in JSON (a flag) or Python literal form (what a YAML
    ``--config`` entry becomes on the command line)."""
    if isinstance(value, dict):
        parsed = value
    elif isinstance(value, str):
        text = value.strip() or "{}"
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise DifftuneError(f"peft option 'options' must be a JSON object, e.g. "
                                    f"'{{\"decompose_both\": true}}', got {value!r}") from None
    else:
        raise DifftuneError(f"peft option 'options' must be a dict or JSON text, got {value!r}")
    if not isinstance(parsed, dict) or not all(isinstance(key, str) for key in parsed):
        raise DifftuneError(f"peft option 'options' must be a JSON object with field names as keys, "
                            f"got {value!r}")
    return dict(parsed)
