"""State dicts in the formats other tools read: LoRA files (A1111, Forge, ComfyUI, kohya sd-scripts,
ai-toolkit, diffusers' ``load_lora_weights``) and the LyCORIS/ComfyUI ``.diff`` full-weight form. The
keys come from the model family's `LoraKeyLayout` (kohya's ``lora_unet_*``, OneTrainer's
``lora_transformer_*``, diffusers' ``transformer.*``), one rule per layout for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DifftuneError
from ..families import LoraKeyLayout
from .deltas import Factors


def lora_tensors(
    layout: LoraKeyLayout,
    component: str,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    denoiser_config: Mapping[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """``{module: (down, up, alpha)}`` → the layout's keys. The LoRA update is alpha/rank · up·down
    (rank = down's first size), which is how A1111, ComfyUI and diffusers all scale such a file; a
    layout without alpha tensors (read as alpha = rank) gets alpha/rank · up instead."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up, alpha) in factors.items():
        name = layout.key(component, module, denoiser_config)
        tensors[f"{name}.{layout.down}"] = down
        if layout.writes_alpha:
            tensors[f"{name}.{layout.up}"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        else:
            tensors[f"{name}.{layout.up}"] = up * (float(alpha) / down.shape[0])
    return tensors


def lora_factors_from_svd(
    factors: Mapping[str, Factors],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Extracted factors at scale 1, with one alpha for the whole file (the largest rank R; a layer of
    rank r gets up·r/R). A file whose alphas differ between layers loads wrongly in diffusers 0.42:
    its alpha_pattern keeps kohya-converted names that match no module, and those layers fall back
    to the common alpha. One alpha is read the same way by every tool."""
    alpha = float(max(f.rank for f in factors.values()))
    return {m: (f.down, f.up * (f.rank / alpha), alpha) for m, f in factors.items()}


def diff_tensors(
    layout: LoraKeyLayout, component: str, deltas: Mapping[str, torch.Tensor],
    denoiser_config: Mapping[str, Any] | None
) -> dict[str, torch.Tensor]:
    """Full ΔW per changed tensor: ``<name>.diff`` for weights, ``<name>.diff_b`` for biases, the
    keys LyCORIS writes and ComfyUI and A1111 apply as W ← W + Δ (the names of the layout's modules)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, delta in deltas.items():
        module, _, attribute = key.rpartition(".")
        suffix = {"weight": "diff", "bias": "diff_b"}.get(attribute)
        if suffix is None:
            raise DifftuneError(f"cannot write a diff for '{key}' (only weights and biases)")
        tensors[f"{layout.key(component, module, denoiser_config)}.{suffix}"] = delta
    return tensors
