"""State dicts in the formats other tools read: kohya LoRA (A1111, Forge, ComfyUI, kohya sd-scripts,
diffusers' ``load_lora_weights``), the LyCORIS/ComfyUI ``.diff`` full-weight form, and the names
ComfyUI expects for SD3. The keys come from `names.kohya_module_name`, one rule for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import DifftuneError
from .deltas import Factors
from .names import kohya_module_name


def kohya_lora_tensors(
    family: str,
    component: str,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    unet_config: Mapping[str, Any] | None,
) -> dict[str, torch.Tensor]:
    """``{module: (down, up, alpha)}`` → kohya keys. The LoRA update is alpha/rank · up·down (rank =
    down's first size), which is how A1111, ComfyUI and diffusers all scale a kohya file."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (down, up, alpha) in factors.items():
        name = kohya_module_name(family, component, module, unet_config)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def lora_factors_from_peft(
    state: Mapping[str, torch.Tensor], alpha: float, rank: int, rslora: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A difftune/peft LoRA (``<module>.lora_A.weight`` / ``lora_B``) as exact kohya factors.

    peft scales by alpha/rank (alpha/√rank with rsLoRA); kohya files always scale by alpha/rank,
    so rsLoRA's alpha is written as alpha·√rank. Keeping the trained alpha (instead of alpha =
    rank, what diffusers' ``convert_state_dict_to_kohya`` writes) keeps the strength exact."""
    if any(".lora_magnitude_vector" in key for key in state):
        raise DifftuneError("a DoRA adapter has no exact kohya LoRA form; export it with --rank or --energy")
    written_alpha = alpha * math.sqrt(rank) if rslora else alpha
    modules = sorted({key.rsplit(".lora_A.", 1)[0] for key in state if ".lora_A." in key})
    return {m: (state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"], written_alpha) for m in modules}


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
    family: str, component: str, deltas: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any] | None
) -> dict[str, torch.Tensor]:
    """Full ΔW per changed tensor: ``<name>.diff`` for weights, ``<name>.diff_b`` for biases, the
    keys LyCORIS writes and ComfyUI and A1111 apply as W ← W + Δ."""
    tensors: dict[str, torch.Tensor] = {}
    for key, delta in deltas.items():
        module, _, attribute = key.rpartition(".")
        suffix = {"weight": "diff", "bias": "diff_b"}.get(attribute)
        if suffix is None:
            raise DifftuneError(f"cannot write a diff for '{key}' (only weights and biases)")
        tensors[f"{kohya_module_name(family, component, module, unet_config)}.{suffix}"] = delta
    return tensors
