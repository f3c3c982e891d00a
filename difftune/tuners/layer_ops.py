"""How an adapter path runs through a Linear or Conv2d the way the base layer does.

Layer-wrapping methods read a weight as a matrix W (out × K), K = in·kh·kw for a conv
kernel. A low-rank path "down" (r × K) then "up" (out × r) is then a Linear pair, or for
a conv a kh×kw convolution with the base layer's stride/padding followed by a 1×1
convolution. These helpers are that one idea, shared by SVFit (U_r, V_rᵀ) and TLoRA
(its tensor-ring residual and its LoRA residual).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TargetError
from .base import AdapterConfig, LayerAdapter

WRAPPABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def check_ungrouped(method: str, modules: dict[str, nn.Module]) -> None:
    """Refuse grouped/depthwise convolutions: their kernel is not an out × K matrix map."""
    grouped = [f"{name} (Conv2d groups={m.groups})" for name, m in modules.items()
               if isinstance(m, nn.Conv2d) and m.groups != 1]
    if grouped:
        shown = ", ".join(grouped[:8]) + (f" and {len(grouped) - 8} more" if len(grouped) > 8 else "")
        raise TargetError(f"{method} cannot adapt grouped convolutions: {shown}. "
                          "Narrow --targets to exclude them.")


class WrappingLayerAdapter(LayerAdapter):
    """A method that wraps every targeted Linear and ungrouped Conv2d layer (SVFit, TLoRA)."""

    supported_layers = WRAPPABLE_LAYERS
    supported_description = "Linear and (ungrouped) Conv2d layers"

    @classmethod
    def check_targets(cls, modules: dict[str, nn.Module], config: AdapterConfig | None = None) -> None:
        super().check_targets(modules, config)
        check_ungrouped(cls.method, modules)

    def set_forward_mode(self, mode: str) -> None:
        """Switch how the unmerged forward is computed (same outputs): auto, factored, dense.

        Every wrapping method has the three modes (its config's ``forward_mode``)."""
        for layer in self.layers.values():
            layer.forward_mode = mode
        self.config.forward_mode = mode


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out, K): the weight read as a matrix."""
    weight = module.weight
    return weight.shape[0], weight[0].numel()


def weight_matrix(module: nn.Module) -> torch.Tensor:
    return module.weight.reshape(module.weight.shape[0], -1)


def input_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def kernel_numel(module: nn.Module) -> int:
    """kh·kw for a conv, 1 for a Linear."""
    return 1 if isinstance(module, nn.Linear) else module.kernel_size[0] * module.kernel_size[1]


def down_project(module: nn.Module, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Apply ``down`` (r × K) to the layer input as the base layer would apply its weight."""
    if isinstance(module, nn.Linear):
        return F.linear(x, down)
    kernel = down.reshape(down.shape[0], *module.weight.shape[1:])
    return module._conv_forward(x, kernel, None)


def up_project(module: nn.Module, z: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Apply ``up`` (out × r) to the output of `down_project` (a 1×1 conv for a Conv2d)."""
    if isinstance(module, nn.Linear):
        return F.linear(z, up)
    return F.conv2d(z, up[:, :, None, None])


def forward_with_weight(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The base layer's forward with another weight (given as a matrix or in its shape)."""
    weight = weight.reshape(module.weight.shape)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def map_channels(module: nn.Module, x: torch.Tensor,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` (rows of length in_channels → same) to every input vector of the layer:
    the last dimension of a Linear input, the channel dimension of a conv input."""
    if isinstance(module, nn.Linear):
        return fn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    moved = x.movedim(1, -1)
    return fn(moved.reshape(-1, moved.shape[-1])).reshape(moved.shape).movedim(-1, 1)


def input_vectors(module: nn.Module, x: torch.Tensor) -> int:
    """How many input vectors (tokens or pixels) one call maps."""
    if isinstance(module, nn.Linear):
        return x.numel() // max(x.shape[-1], 1)
    return x.shape[0] * x.shape[-2] * x.shape[-1]


def output_positions(module: nn.Module, x: torch.Tensor) -> int:
    """How many output vectors one call produces (each costs one K-long dot product per row of W)."""
    if isinstance(module, nn.Linear):
        return input_vectors(module, x)
    if module.padding == "same":
        return input_vectors(module, x)
    sizes = []
    for dim, size in enumerate(x.shape[-2:]):
        pad = module.padding[dim] if isinstance(module.padding, tuple) else 0
        span = module.dilation[dim] * (module.kernel_size[dim] - 1) + 1
        sizes.append((size + 2 * pad - span) // module.stride[dim] + 1)
    return x.shape[0] * max(sizes[0], 1) * max(sizes[1], 1)


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """Trainable adapter tensors are fp32 masters (fp64 for an fp64 base), whatever the base."""
    return torch.float64 if module.weight.dtype == torch.float64 else torch.float32
