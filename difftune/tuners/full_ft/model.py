"""Full fine-tuning as a method: one `FullLayer` per targeted Linear/Conv2d.

The paper baselines of SaRA's style experiment include full fine-tuning; as an adapter it trains
through the same trainers, checkpoints, files and exports as the parameter-efficient methods, and
its file holds ΔW = W − W0 of every targeted weight (as large as the weights it changes).
"""

from __future__ import annotations

from torch import nn

from ..base import AdapterLayer
from ..layer_ops import WrappingLayerAdapter
from .config import FullConfig
from .layer import FullLayer


class FullAdapter(WrappingLayerAdapter):
    method = "full_ft"
    config_class = FullConfig
    quantized_base_refusal = ("full fine-tuning changes every entry of the base weight: use "
                              "--mixed_precision bf16 instead")
    config: FullConfig
    layers: dict[str, FullLayer]

    def default_learning_rate(self) -> float:
        return 1e-5  # the usual full fine-tuning rate of Stable Diffusion (diffusers' train_text_to_image)

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        return FullLayer(module, self.config)
