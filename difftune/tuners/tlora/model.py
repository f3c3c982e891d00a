"""The TLoRA adapter: one `TLoraLayer` per targeted Linear/Conv2d."""

from __future__ import annotations

import torch
from torch import nn

from ..base import AdapterLayer
from ..layer_ops import WrappingLayerAdapter
from . import functional as tlf
from .config import TLoraConfig
from .layer import TLoraLayer

PAPER_LEARNING_RATE = 1e-4  # the published subject-driven recipe (SDXL, constant)


class TLoraAdapter(WrappingLayerAdapter):
    method = "tlora"
    config_class = TLoraConfig

    config: TLoraConfig
    layers: dict[str, TLoraLayer]
    quantized_base_refusal = ("tlora needs the dense base weight (TLoRA multiplies it by its transform): "
                              "use --mixed_precision bf16 instead")

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        return TLoraLayer(module, self.config)

    def default_learning_rate(self) -> float | None:
        return PAPER_LEARNING_RATE

    def regularization_loss(self) -> torch.Tensor | None:
        """identity_reg · Σ_layers Σ_d ‖A_d − I/R‖_F (None when off)."""
        if not self.config.identity_reg:
            return None
        total = sum(tlf.identity_distance(layer.transform_cores()) for layer in self.layers.values())
        return self.config.identity_reg * total
