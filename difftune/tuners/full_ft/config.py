"""Options of full fine-tuning."""

from __future__ import annotations

import dataclasses

from ...errors import DifftuneError
from ...options import option
from ..base import AdapterConfig


@dataclasses.dataclass
class FullConfig(AdapterConfig):
    """W = W0 + alpha · ΔW with every entry of ΔW trained: full fine-tuning of the targeted weights, as
    an adapter (the base weights stay untouched, so the change can be scaled, merged, removed, saved
    and exported like any other method's). Biases and normalisation layers stay frozen.
    """

    targets: str | list[str] = option("all", "layers to adapt (preset, regex or list; default: every "
                                             "Linear and Conv2d: the denoiser but its biases and norms)")
    alpha: float = option(1.0, "multiplier on the trained change ΔW")

    def validate(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise DifftuneError(f"full_ft option 'alpha' must be a positive number, got {self.alpha!r}")
