"""The full fine-tuning layer: wraps one Linear or Conv2d with a dense trainable ΔW."""

from __future__ import annotations

import torch
from torch import nn

from ..base import AdapterLayer
from ..layer_ops import adapter_dtype, down_project, forward_with_weight
from .config import FullConfig


class FullLayer(AdapterLayer):
    """(W0 + alpha·scale·ΔW)·x + b, ``full_delta`` = ΔW in the weight's shape (zero at attach), kept in
    float32 (`adapter_dtype`) whatever the base weight's dtype."""

    def __init__(self, base_layer: nn.Module, config: FullConfig):
        super().__init__(base_layer)
        self.alpha = float(config.alpha)
        weight = base_layer.weight
        self.full_delta = nn.Parameter(torch.zeros(weight.shape, dtype=adapter_dtype(base_layer),
                                                   device=weight.device))

    def delta_weight(self) -> torch.Tensor:
        return self.full_delta.float() * self.alpha

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.plain
        delta = self.full_delta * (self.alpha * self.scale)
        if self.base_layer is not plain:  # around other adapters' layers: ΔW·x added to what they compute
            return self.base_layer(x) + down_project(plain, x, delta.reshape(delta.shape[0], -1).to(x.dtype))
        weight = plain.weight
        return forward_with_weight(plain, x, weight + delta.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
