"""An exponential moving average of the adapter's trainable tensors (``--use_ema``).

diffusers' `EMAModel` does the averaging (its rule: the decay of step n is
min(decay, (1 + n) / (10 + n)), so early steps follow the weights closely); this module points
it at the tensors an adapter trains (LoRA factors, SaRA's selected values, SVFit's singular
values, ...) and gives the trainer what it needs around it: the averaged weights swapped in for
validation and for the saved file, and the state in checkpoints for an exact resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..api import trainable_parameters


class AdapterEMA:
    """The moving average of every trainable parameter of ``modules`` (the adapted denoiser)."""

    def __init__(self, modules: Sequence[nn.Module], decay: float):
        from diffusers.training_utils import EMAModel

        self.parameters = [p for module in modules for p in trainable_parameters(module)]
        self.average = EMAModel(self.parameters, decay=decay)

    def step(self) -> None:
        """Fold the current weights into the average (after each optimizer step)."""
        self.average.step(self.parameters)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the trained ones, the trained ones back afterwards."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved average; its tensors move to the device of the trained ones."""
        shadow = state.get("shadow_params", [])
        if len(shadow) != len(self.parameters) or any(
                s.shape != p.shape for s, p in zip(shadow, self.parameters, strict=True)):
            raise ValueError(f"the saved average holds {len(shadow)} tensors, the adapter trains "
                             f"{len(self.parameters)} of other shapes")
        self.average.load_state_dict(state)
        device = self.parameters[0].device if self.parameters else torch.device("cpu")
        self.average.to(device)
