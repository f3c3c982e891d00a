"""The SVFit layer: wraps one Linear or Conv2d."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import DifftuneError
from ..base import AdapterLayer
from ..layer_ops import (
    adapter_dtype,
    down_project,
    forward_with_weight,
    matrix_shape,
    output_positions,
    up_project,
)
from . import functional as svf
from .config import SVFitConfig


class SVFitLayer(AdapterLayer):
    """W0 + alpha·U_r diag(s − σ) V_rᵀ; trains ``svfit_s`` only.

    ``svfit_U`` / ``svfit_Vh`` are recomputed from the base weight at attach (non-persistent
    buffers, so files stay small); ``svfit_sigma`` (the base's σ_1..σ_r) is saved with s and
    lets a load verify that the base model is the one trained on. ``rank`` overrides the
    configured rule (a file's rank: its load then runs one SVD per layer).
    """

    def __init__(self, base_layer: nn.Module, config: SVFitConfig, name: str = "", rank: int | None = None):
        super().__init__(base_layer)
        self.name = name
        self.alpha = float(config.alpha)
        self.forward_mode = config.forward_mode
        self.svd_dtype = config.svd_dtype
        self.rank_option, self.energy = config.rank, config.energy
        self.set_rank(rank)

    @torch.no_grad()
    def set_rank(self, rank: int | None) -> None:
        """(Re)compute the SVD split; ``rank`` overrides the configured rule (used by loads). The SVD is
        of W0, the layer's weight without any other adapter's change."""
        base = self.plain
        weight = self.base_weight()
        shape = matrix_shape(base)
        rule = self.rank_option if rank is None else rank
        if weight.is_meta:
            if rule is None:
                raise DifftuneError(
                    f"svfit at '{self.name}': choosing the rank by energy needs the real weights, "
                    "not a meta-device model; give rank=<int> or rank='full' to count parameters")
            r = svf.resolve_rank(shape, rule, self.energy, None)
            u = torch.empty(shape[0], r, device="meta")
            sigma = torch.empty(r, device="meta")
            vh = torch.empty(r, shape[1], device="meta")
        else:
            u_full, sigma_full, vh_full = svf.singular_triplets(weight.reshape(weight.shape[0], -1),
                                                                self.svd_dtype)
            r = svf.resolve_rank(shape, rule, self.energy, sigma_full)
            u, sigma, vh = u_full[:, :r], sigma_full[:r], vh_full[:r]
        master = adapter_dtype(base)
        self.register_buffer("svfit_U", u.to(weight.dtype).contiguous(), persistent=False)
        self.register_buffer("svfit_Vh", vh.to(weight.dtype).contiguous(), persistent=False)
        self.register_buffer("svfit_sigma", sigma.to(master).clone())
        self.svfit_s = nn.Parameter(sigma.to(master).clone())

    @property
    def rank(self) -> int:
        return self.svfit_s.shape[0]

    def delta_s(self) -> torch.Tensor:
        """alpha·(s − σ): the change of the singular values (zero at attach)."""
        return (self.svfit_s - self.svfit_sigma) * self.alpha

    def delta_weight(self) -> torch.Tensor:
        d = self.delta_s().float()
        matrix = svf.delta_matrix(self.svfit_U.float(), d, self.svfit_Vh.float())
        return matrix.reshape(self.plain.weight.shape)

    def choose_mode(self, x: torch.Tensor) -> str:
        if self.forward_mode != "auto":
            return self.forward_mode
        plain = self.plain
        out, k = matrix_shape(plain)
        training = torch.is_grad_enabled() and self.svfit_s.requires_grad
        return svf.cheaper_mode(output_positions(plain, x), self.rank, out, k, training)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.plain
        u, vh = self.svfit_U, self.svfit_Vh
        d = (self.delta_s() * self.scale).to(u.dtype)
        # dense only around the plain layer: around other adapters' layers their output is needed
        if self.base_layer is base and self.choose_mode(x) == "dense":
            weight = base.weight + svf.delta_matrix(u, d, vh).reshape(base.weight.shape)
            return forward_with_weight(base, x, weight)
        z = down_project(base, x, vh)
        z = z * (d if isinstance(base, nn.Linear) else d[:, None, None])
        return self.base_layer(x) + up_project(base, z, u)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, forward_mode={self.forward_mode}"
