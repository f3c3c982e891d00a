"""The TLoRA layer: wraps one Linear or Conv2d.

For a conv, T acts on the input channels (W0·(T ⊗ I_{kh·kw}) on the kernel read as
out × in·kh·kw, i.e. the same channel mix at every kernel tap) and Δ is a residual on
the whole out × in·kh·kw kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..base import AdapterLayer
from ..layer_ops import (
    adapter_dtype,
    down_project,
    forward_with_weight,
    input_channels,
    input_vectors,
    kernel_numel,
    map_channels,
    matrix_shape,
    output_positions,
    up_project,
)
from . import functional as tlf
from .config import TLoraConfig


def transform_weight(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """W0 with ``transform`` (in × in) applied on its input channels: W0·T for a Linear."""
    if weight.ndim == 2:
        return weight @ transform
    return torch.einsum("oihw,ij->ojhw", weight, transform)


class TLoraLayer(AdapterLayer):
    """(W0·T + s·Δ)·x; trains the cores of T and of Δ (or Δ's LoRA pair)."""

    def __init__(self, base_layer: nn.Module, config: TLoraConfig):
        super().__init__(base_layer)
        base_layer = self.plain  # the model's own layer (``base_layer`` may be another adapter's)
        out, k = matrix_shape(base_layer)
        channels = input_channels(base_layer)
        tensor_kwargs = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer)}
        self.forward_mode = config.forward_mode
        self.transform_factors = tlf.factorize(channels, config.num_cores)
        self.transform_rank = config.transform_rank
        self.tlora_transform = nn.ParameterList(
            tlf.identity_trm_cores(self.transform_factors, config.transform_rank, **tensor_kwargs))
        self.residual = config.residual
        self.residual_rank = config.effective_rank
        self.residual_scale = tlf.residual_scale(config.alpha, self.residual_rank)
        if self.residual == "tr":
            self.residual_factors = (tlf.factorize(out, config.num_cores),
                                     tlf.factorize(k, config.num_cores))
            out_cores, in_cores = tlf.init_tr_cores(*self.residual_factors, self.residual_rank,
                                                    **tensor_kwargs)
            self.tlora_residual_out = nn.ParameterList(out_cores)
            self.tlora_residual_in = nn.ParameterList(in_cores)
        else:
            self.tlora_lora_A = nn.Parameter(torch.empty(self.residual_rank, k, **tensor_kwargs))
            self.tlora_lora_B = nn.Parameter(torch.zeros(out, self.residual_rank, **tensor_kwargs))
            nn.init.kaiming_uniform_(self.tlora_lora_A, a=math.sqrt(5))  # as peft's LoRA A

    # --- the two parts ----------------------------------------------------------------

    def transform_cores(self) -> list[torch.Tensor]:
        return list(self.tlora_transform)

    def residual_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with Δ = up·down: out × r' and r' × K (r' = R² for a tensor ring)."""
        if self.residual == "tr":
            return tlf.tr_factors(list(self.tlora_residual_out), list(self.tlora_residual_in))
        return self.tlora_lora_B, self.tlora_lora_A

    def transform_matrix(self) -> torch.Tensor:
        return tlf.trm_dense(self.transform_cores())

    def residual_matrix(self) -> torch.Tensor:
        up, down = self.residual_pair()
        return up @ down

    def delta_weight(self) -> torch.Tensor:
        """ΔW = W0·(T − I) + s·Δ, so that W0 + ΔW = W0·T + s·Δ (W0 without any other adapter's change:
        stacked, TLoRA's update is this ΔW, added to the others')."""
        weight = self.base_weight().float()
        transform = self.transform_matrix().float()
        transformed = transform_weight(weight, transform) - weight
        residual = self.residual_matrix().float().reshape(weight.shape)
        return transformed + self.residual_scale * residual

    # --- forward ----------------------------------------------------------------------

    def choose_mode(self, x: torch.Tensor) -> str:
        if self.forward_mode != "auto":
            return self.forward_mode
        base = self.plain
        out, k = matrix_shape(base)
        width = input_channels(base)
        training = torch.is_grad_enabled() and self.tlora_transform[0].requires_grad
        passes = 3 if training else 1
        contract = (input_vectors(base, x) * tlf.trm_apply_flops(self.transform_factors, self.transform_rank)
                    * passes * tlf.CONTRACTION_COST_FACTOR)
        # W0·T built per call (and, training, the weight gradient and its way back to T)
        build = width * width * self.transform_rank ** 2 + out * width * width * kernel_numel(base)
        dense = build * (2 if training else 1)
        if training:
            dense += output_positions(base, x) * out * k
        return "factored" if contract <= dense else "dense"

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.plain
        scale = self.scale
        cores = self.transform_cores()
        if self.stacked:
            y = self._stacked_transform(x, cores)
        elif self.choose_mode(x) == "dense":
            transform = tlf.trm_dense(cores)
            if scale != 1.0:
                eye = torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
                transform = torch.lerp(eye, transform, scale)
            weight = transform_weight(base.weight.to(transform.dtype), transform)
            y = forward_with_weight(base, x, weight.to(base.weight.dtype))
        else:
            def transform_rows(rows: torch.Tensor) -> torch.Tensor:
                work = rows.to(cores[0].dtype)
                change = tlf.trm_apply(work, cores) - work
                return rows + (change * scale).to(rows.dtype)

            y = base(map_channels(base, x, transform_rows))
        up, down = self.residual_pair()
        residual = up_project(base, down_project(base, x.to(down.dtype), down), up)
        return y + (residual * (scale * self.residual_scale)).to(y.dtype)

    def _stacked_transform(self, x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
        """inner(x) + W0·(s·(T − I)x): the transform's part of ΔW on top of what the wrapped layers
        compute (other adapters), W0 without their changes. One more product with W0 than alone."""
        base, scale = self.plain, self.scale

        def change_rows(rows: torch.Tensor) -> torch.Tensor:
            work = rows.to(cores[0].dtype)
            return ((tlf.trm_apply(work, cores) - work) * scale).to(rows.dtype)

        weight = self.base_weight()
        change = down_project(base, map_channels(base, x, change_rows), weight.reshape(weight.shape[0], -1))
        return self.base_layer(x) + change

    def extra_repr(self) -> str:
        return (f"transform_factors={self.transform_factors}, transform_rank={self.transform_rank}, "
                f"residual={self.residual}, rank={self.residual_rank}, forward_mode={self.forward_mode}")
