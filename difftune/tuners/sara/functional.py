"""SaRA's training math (Hu et al., ICLR 2025) as functions of tensors, apart from the adapter.

The trained entries of one weight are a flat ``index`` into it, their base values W0[M]
and the trained deltas Δ (so W[M] = W0[M] + Δ); ``frozen`` marks the entries the
progressive adjustment froze (None before it). The adapter (`model.SaraAdapter`) decides
when each of these runs; the numbers come from here:

- the paper's learning-rate rule, lr = 1e-3·exp(−350·θ);
- decoupled weight decay on the absolute values W0 + Δ of the still-trained entries;
- the progressive adjustment M ← M ∧ (|W| < θ), and the optimizer moments of the entries
  it freezes;
- the subgradient λ·(U Vᵀ)[M] of the low-rank term λ·‖W ⊙ M‖_* (`low_rank` computes U Vᵀ).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .low_rank import nuclear_norm_subgradient


def auto_learning_rate(threshold: float) -> float:
    """The paper's rule when no learning rate is given: 1e-3·exp(−350·θ)."""
    return 1e-3 * math.exp(-350.0 * threshold)


def float32(value: float) -> float:
    """``value`` rounded to float32: thresholds are compared with float32 magnitudes."""
    return float(torch.tensor(value, dtype=torch.float32))


@torch.no_grad()
def decay_(delta: torch.Tensor, base: torch.Tensor, frozen: torch.Tensor | None, rate: float) -> None:
    """Δ ← Δ − rate·(W0 + Δ) in place: AdamW's decoupled decay on the absolute values, frozen
    entries left alone (``rate`` = lr·weight_decay)."""
    if frozen is None:
        delta.mul_(1.0 - rate).sub_(base.to(delta.dtype), alpha=rate)
    else:
        decay = torch.add(base.float(), delta.detach().float()).mul_(rate).masked_fill_(frozen, 0.0)
        delta.sub_(decay.to(delta.dtype))


def grown_entries(values: torch.Tensor, threshold: float, frozen: torch.Tensor | None) -> torch.Tensor:
    """The entries that leave the set at the progressive adjustment: |W| ≥ θ, or frozen already."""
    leave = ~((values < threshold) & (values > -threshold))
    if frozen is not None:
        leave |= frozen
    return leave


@torch.no_grad()
def zero_moments_(state: dict[str, Any], leave: torch.Tensor) -> None:
    """Zero the optimizer state of the ``leave`` entries (any state tensor shaped like the delta), so
    that with a zero gradient and no decay the optimizer leaves them where they are."""
    for tensor in state.values():
        if torch.is_tensor(tensor) and tensor.shape == leave.shape:
            tensor.masked_fill_(leave, 0)


@torch.no_grad()
def rank_subgradient(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...],
                     frozen: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(U Vᵀ)[M] in ``dtype`` and ‖W ⊙ M‖_* for the masked matrix W ⊙ M whose entries at ``index``
    are ``values`` (W0 + Δ in float32); frozen entries count as 0 and get no gradient."""
    if frozen is not None:
        values = values.masked_fill(frozen, 0.0)
    masked = torch.zeros(shape, dtype=torch.float32, device=values.device)
    masked.view(-1).index_put_((index,), values)
    subgradient, norm = nuclear_norm_subgradient(masked)
    picked = subgradient.reshape(-1).index_select(0, index).to(dtype)
    if frozen is not None:
        picked.masked_fill_(frozen, 0.0)
    return picked, norm
