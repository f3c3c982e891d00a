"""Which entries SaRA trains: M = |W0| < θ over the targeted tensors.

θ is given, or comes from a budget (a count, or a fraction of the targeted entries)
through an exact global quantile that never concatenates the model's magnitudes
(see `threshold_for_count`). Masks are kept as sorted flat indices
(int32, 4 bytes per selected entry) and written to files as whichever is smaller of
those indices or a bit mask (1 bit per entry of the tensor).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ...errors import DifftuneError
from ...sparse_backprop import base_tensor, compact_index

_HIGH_BINS = 1 << 15  # top 16 bits of a non-negative float32 (sign bit 0)
_LOW_BINS = 1 << 16
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def is_norm_layer(module: nn.Module) -> bool:
    """GroupNorm, LayerNorm, RMSNorm, diffusers' own norms: anything called *Norm*."""
    return "Norm" in type(module).__name__ and any(True for _ in module.parameters(recurse=False))


def targeted_tensors(
    model: nn.Module, modules: dict[str, nn.Module], include_bias_norm: bool
) -> dict[str, torch.Tensor]:
    """``{"<module>.<param>": tensor}``: targeted weights, plus biases and norms on request."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for pname in ("weight", "bias") if include_bias_norm else ("weight",):
            if module._parameters.get(pname) is not None:  # W0, without other SaRA adapters' entries
                tensors[f"{name}.{pname}"] = base_tensor(module, pname)
    if include_bias_norm:
        for name, module in model.named_modules():
            if name not in modules and is_norm_layer(module):
                for pname, param in module.named_parameters(recurse=False):
                    tensors[f"{name}.{pname}"] = param
    return tensors


def _magnitude_bits(tensor: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |w| (the float32 sign bit cleared)."""
    return tensor.detach().float().reshape(-1).view(torch.int32) & 0x7FFFFFFF


def threshold_for_count(tensors: Iterable[torch.Tensor], count: int) -> float:
    """The θ for which exactly ``count`` entries have |w| < θ (fewer only on ties at θ).

    θ is the (count+1)-th smallest magnitude. Non-negative float32 numbers order like
    their int32 bit patterns, so two histogram passes over 16-bit digits of those
    patterns find it exactly, with per-tensor temporaries only (the model's magnitudes
    are never concatenated or sorted).
    """
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    if count < 1:
        raise DifftuneError(f"sara option 'budget' must select at least one entry, got {count}")
    if count >= total:  # everything: the float32 just above the largest magnitude
        largest = max(int(_magnitude_bits(t).max()) for t in tensors)
        return _float32_from_bits(largest + 1)
    high = torch.zeros(_HIGH_BINS, dtype=torch.int64)
    for tensor in tensors:
        high += torch.bincount(_magnitude_bits(tensor) >> 16, minlength=_HIGH_BINS).cpu()[:_HIGH_BINS]
    cumulative = high.cumsum(0)
    high_digit = int(torch.searchsorted(cumulative, count, right=True))
    rank = count - (int(cumulative[high_digit - 1]) if high_digit else 0)
    low = torch.zeros(_LOW_BINS, dtype=torch.int64)
    for tensor in tensors:
        bits = _magnitude_bits(tensor)
        in_bin = bits[(bits >> 16) == high_digit] & 0xFFFF
        low += torch.bincount(in_bin, minlength=_LOW_BINS).cpu()
    low_digit = int(torch.searchsorted(low.cumsum(0), rank, right=True))
    # ties at 0 (zero-initialised weights) would select nothing: take the zeros too
    return _float32_from_bits(max(1, (high_digit << 16) | low_digit))


def _float32_from_bits(pattern: int) -> float:
    return float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32)[0])


def budget_to_count(budget: float, total: int) -> int:
    """A budget below 1 is a fraction of the targeted entries; 1 or more is a count."""
    if budget < 1:
        return max(1, round(budget * total))
    return round(budget)


def select_entries(tensor: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted flat indices of |w| < θ, compared in float32 (int32 when the tensor allows)."""
    values = tensor.detach().float().reshape(-1)
    mask = (values < threshold) & (values > -threshold)
    return compact_index(torch.nonzero(mask).reshape(-1), tensor.numel())


def index_to_mask(index: torch.Tensor, numel: int) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool, device=index.device)
    mask[index.long()] = True
    return mask


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool vector as uint8 bytes, 8 entries per byte (little-endian bit order)."""
    padded = torch.zeros(math.ceil(mask.numel() / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask.reshape(-1)
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel]


def encode_mask(index: torch.Tensor, numel: int) -> tuple[str, torch.Tensor]:
    """The smaller of ("index", int32 indices) and ("bits", packed bit mask)."""
    if 4 * index.numel() <= math.ceil(numel / 8):
        return "index", compact_index(index, numel).cpu()
    return "bits", pack_bits(index_to_mask(index, numel)).cpu()


def decode_mask(kind: str, data: torch.Tensor, numel: int) -> torch.Tensor:
    if kind == "index":
        return compact_index(data.reshape(-1), numel)
    if kind == "bits":
        if data.numel() != math.ceil(numel / 8):
            raise DifftuneError(f"bit mask has {data.numel()} bytes, expected {math.ceil(numel / 8)}")
        return compact_index(torch.nonzero(unpack_bits(data, numel)).reshape(-1), numel)
    raise DifftuneError(f"unknown mask encoding '{kind}'")


def mask_disagreement(
    tensor: torch.Tensor, index: torch.Tensor, threshold: float, relative_tolerance: float
) -> tuple[int, int]:
    """``(differing, unexplained)``: entries where a stored mask and |w| < θ disagree.

    A disagreement is explained when |w| lies within ``relative_tolerance``·θ of θ, which
    is what rounding the same weights to another dtype does; anything else means the
    base model's weights are not the ones the mask was made on.
    """
    magnitude = tensor.detach().float().abs().reshape(-1)
    differs = (magnitude < threshold) ^ index_to_mask(index.to(tensor.device), tensor.numel())
    near = (magnitude - threshold).abs() <= relative_tolerance * threshold
    return int(differs.sum()), int((differs & ~near).sum())
