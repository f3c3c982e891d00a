"""SaRA adapter files: what is saved, how a file's masks are read back and checked, and combining.

Per trained tensor a file holds the exact deltas Δ (``<param>.sara_delta``, 1-D float32) and
the mask M, as sorted flat indices or a bit mask whichever is smaller
(``<param>.sara_mask_index`` / ``<param>.sara_mask_bits``). The header's ``extra`` records θ
(and a per-tensor θ for combined files), the number of entries and the base dtype: a load
rebuilds the adapter from the stored masks and checks each against |W0| < θ on the base it is
loaded into, so the wrong base is refused, and no mask is computed from the config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from ...adapter_file import AdapterSection
from ...errors import AdapterFileError, BaseModelMismatchError, DifftuneError
from ...sparse_backprop import SparseEntries, base_parameters, compact_index
from .selection import decode_mask, encode_mask, mask_disagreement

logger = logging.getLogger(__name__)

DELTA_SUFFIX = "sara_delta"
MASK_SUFFIXES = {"sara_mask_index": "index", "sara_mask_bits": "bits"}
_MASK_DTYPES = {"index": (torch.int32, torch.int64), "bits": (torch.uint8,)}


@dataclasses.dataclass
class SaraFileFacts:
    """What a SaRA file's header ``extra`` says about its masks (`file_extra` writes it)."""

    threshold: float
    thresholds: dict[str, float]  # per tensor, where it differs (combined files)
    selected: int | None  # entries in the file (None in files that predate the field)
    base_dtype: str

    @classmethod
    def from_extra(cls, extra: dict[str, Any], source: str) -> SaraFileFacts:
        """Read and check the fields; a damaged one is named."""
        if "threshold" not in extra:
            raise AdapterFileError(f"{source}: SaRA file without 'threshold' metadata")
        threshold, thresholds = extra["threshold"], extra.get("thresholds", {})
        if not _is_number(threshold) or not threshold > 0:
            raise AdapterFileError(f"{source}: header field 'extra.threshold' must be a positive number, "
                                   f"got {threshold!r}")
        if not isinstance(thresholds, dict) or not all(_is_number(v) for v in thresholds.values()):
            raise AdapterFileError(f"{source}: header field 'extra.thresholds' must map tensor names to "
                                   "numbers")
        selected = extra.get("selected")
        base_dtype = extra.get("base_dtype", "float32")
        if not isinstance(base_dtype, str) or not isinstance(getattr(torch, base_dtype, None), torch.dtype) \
                or not getattr(torch, base_dtype).is_floating_point:
            raise AdapterFileError(f"{source}: header field 'extra.base_dtype' must name a float dtype, "
                                   f"got {base_dtype!r}")
        return cls(threshold=float(threshold), thresholds={k: float(v) for k, v in thresholds.items()},
                   selected=selected if _is_number(selected) and isinstance(selected, int) else None,
                   base_dtype=base_dtype)

    def threshold_of(self, key: str) -> float:
        return self.thresholds.get(key, self.threshold)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- save -------------------------------------------------------------------------------------

def file_tensors(entries: dict[str, SparseEntries]) -> dict[str, torch.Tensor]:
    """Each tensor's deltas and its mask, in the smaller of the two encodings."""
    tensors: dict[str, torch.Tensor] = {}
    for key, e in entries.items():
        tensors[f"{key}.{DELTA_SUFFIX}"] = e.delta.detach().float()
        kind, data = encode_mask(e.index, math.prod(e.shape))
        tensors[f"{key}.sara_mask_{kind}"] = data
    return tensors


def file_extra(entries: dict[str, SparseEntries], threshold: float, thresholds: dict[str, float],
               progressive_applied: bool) -> dict[str, Any]:
    """The header's ``extra``: what `SaraFileFacts` reads back, and how far training went."""
    first = next(iter(entries.values()))
    extra: dict[str, Any] = {
        "threshold": threshold,
        "selected": sum(e.numel for e in entries.values()),
        "base_dtype": str(first.base.dtype).removeprefix("torch."),
        "progressive_applied": progressive_applied,
        "frozen": sum(int(e.frozen.sum()) for e in entries.values() if e.frozen is not None),
    }
    if thresholds:
        extra["thresholds"] = dict(thresholds)
    return extra


# --- load -------------------------------------------------------------------------------------

def split_file_tensors(tensors: dict[str, torch.Tensor], source: str
                       ) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """``{param key: (mask kind, mask data, delta)}`` from a SaRA file's tensors."""
    deltas: dict[str, torch.Tensor] = {}
    masks: dict[str, tuple[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        key, _, suffix = name.rpartition(".")
        if suffix == DELTA_SUFFIX:
            deltas[key] = value
        elif suffix in MASK_SUFFIXES:
            if key in masks:
                raise AdapterFileError(f"{source}: two masks for '{key}'")
            masks[key] = (MASK_SUFFIXES[suffix], value)
        else:
            raise AdapterFileError(f"{source}: unexpected tensor '{name}' in a SaRA file")
    if deltas.keys() != masks.keys():
        odd = sorted(deltas.keys() ^ masks.keys())
        raise AdapterFileError(f"{source}: SaRA deltas and masks do not pair up: {odd[:3]}")
    return {key: (*masks[key], deltas[key]) for key in deltas}


def check_file_tensors(tensors: dict[str, torch.Tensor], selected: int | None, source: str
                       ) -> dict[str, tuple[str, torch.Tensor, torch.Tensor]]:
    """`split_file_tensors`, checked: every delta pairs with one mask, deltas are 1-D float32, index
    masks 1-D int32/int64 and bit masks 1-D uint8, and together they hold the ``selected`` entries
    the header records (a file missing whole pairs would otherwise load as a smaller adapter)."""
    stored = split_file_tensors(tensors, source)
    for key, (kind, data, delta) in stored.items():
        suffix = f"sara_mask_{kind}"
        if data.dtype not in _MASK_DTYPES[kind] or data.ndim != 1:
            raise AdapterFileError(f"{source}: tensor '{key}.{suffix}' must be a 1-D "
                                   f"{' or '.join(str(d)[6:] for d in _MASK_DTYPES[kind])} tensor, got "
                                   f"{str(data.dtype)[6:]} of shape {list(data.shape)}")
        if delta.dtype != torch.float32 or delta.ndim != 1:
            raise AdapterFileError(f"{source}: tensor '{key}.{DELTA_SUFFIX}' must be a 1-D float32 "
                                   f"tensor, got {str(delta.dtype)[6:]} of shape {list(delta.shape)}")
    if selected is not None:
        found = sum(delta.numel() for _, _, delta in stored.values())
        if found != selected:
            raise AdapterFileError(f"{source}: the file holds {found} SaRA deltas, its header "
                                   f"('extra.selected') says {selected}: tensors are missing")
    return stored


def read_selection(model: nn.Module, tensors: dict[str, torch.Tensor], facts: SaraFileFacts, source: str,
                   known: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(selection, deltas)`` of a file on ``model``: each stored mask decoded, checked to be sorted
    distinct positions of its tensor, and checked against |W0| < θ on ``model`` (disagreements
    within rounding of θ are allowed: the same weights in another dtype). A mask equal to the one
    in ``known`` (an attached adapter's, checked when it was selected) is taken as it is."""
    known = known or {}
    stored = check_file_tensors(tensors, facts.selected, source)
    parameters = base_parameters(model)  # W0, under the names the file uses
    missing = sorted(set(stored) - set(parameters))
    if missing:
        raise BaseModelMismatchError(f"{source}: the base model has no parameter '{missing[0]}' "
                                     "(the SaRA adapter trains entries of it)")
    tolerance = max(torch.finfo(getattr(torch, facts.base_dtype)).eps,
                    *(torch.finfo(parameters[key].dtype).eps for key in stored))
    selection: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key, (kind, data, delta) in stored.items():
        param = parameters[key]
        try:
            index = decode_mask(kind, data, param.numel())
        except DifftuneError as err:
            raise AdapterFileError(f"{source}: mask of '{key}': {err}") from None
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= param.numel()
                              or bool((index[1:] <= index[:-1]).any())):
            raise AdapterFileError(f"{source}: mask of '{key}' is not a sorted list of distinct "
                                   f"positions in 0..{param.numel() - 1}")
        if delta.numel() != index.numel():
            raise AdapterFileError(f"{source}: '{key}' has {delta.numel()} deltas for a mask of "
                                   f"{index.numel()} entries")
        if key not in known or not torch.equal(known[key], index):
            threshold = facts.threshold_of(key)
            differing, unexplained = mask_disagreement(param, index, threshold, tolerance)
            if unexplained:
                raise BaseModelMismatchError(
                    f"{source}: the SaRA mask of '{key}' does not match this base model: "
                    f"{unexplained} of {index.numel()} stored entries disagree with |W0| < "
                    f"{threshold:g} beyond rounding. The adapter was trained on other weights.")
            if differing:
                logger.info("%s: %d mask entries of %s differ only by rounding", source, differing, key)
        selection[key] = index
        deltas[key] = delta
    return selection, deltas


# --- combine ----------------------------------------------------------------------------------

def combine_sections(sections: list[AdapterSection], scales: list[float], sources: list[str]
                     ) -> AdapterSection:
    """One SaRA section for Δ = Σ αᵢ·Δᵢ on the union of the masks.

    On one base model the masks are nested (|W0| < θ grows with θ), so the union of
    a tensor's masks is the mask at the largest θ of the files that hold it; that
    per-tensor θ is recorded so the combined mask is verified like any other.
    """
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    thresholds: dict[str, float] = {}
    for section, scale, source in zip(sections, scales, sources, strict=True):
        facts = SaraFileFacts.from_extra(section.extra, source)
        for key, (kind, data, delta) in check_file_tensors(section.tensors, facts.selected, source).items():
            numel = data.numel() * 8 if kind == "bits" else int(data.max()) + 1  # padding bits are 0
            index = decode_mask(kind, data, numel).long()
            scaled = delta.float() * scale
            if key in combined:
                old_index, old_delta = combined[key]
                union = torch.unique(torch.cat([old_index, index]))
                merged = torch.zeros(union.numel())
                merged.index_add_(0, torch.searchsorted(union, old_index), old_delta)
                merged.index_add_(0, torch.searchsorted(union, index), scaled)
                combined[key] = (union, merged)
            else:
                combined[key] = (index, scaled)
            thresholds[key] = max(thresholds.get(key, -1.0), facts.threshold_of(key))
    tensors: dict[str, torch.Tensor] = {}
    for key, (index, delta) in combined.items():
        tensors[f"{key}.{DELTA_SUFFIX}"] = delta
        tensors[f"{key}.sara_mask_index"] = compact_index(index, int(index.max()) + 1)
    first = sections[0]
    top = max(thresholds.values())
    config = {**first.config, "threshold": top, "budget": None,
              "include_bias_norm": any(s.config.get("include_bias_norm") for s in sections)}
    extra = {**first.extra, "threshold": top,
             "thresholds": {k: v for k, v in thresholds.items() if v != top},
             "merged_from": sources, "merge_scales": list(scales),
             "selected": sum(delta.numel() for _, delta in combined.values())}
    return AdapterSection(
        method=first.method, config=config, extra=extra, tensors=tensors,
        targets=list(dict.fromkeys(t for s in sections for t in s.targets)),
        fingerprint={**first.fingerprint, "shapes": {k: v for s in sections for k, v in s.shapes.items()}})
