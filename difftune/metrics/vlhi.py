"""VLHI, SaRA's Visual-Linguistic Harmony Index: image quality and prompt following in one number.

Within one group of methods evaluated the same way,

    VLHI = (maxFID − FID) / (maxFID − minFID) + (CLIP − minCLIP) / (maxCLIP − minCLIP),

so each term lies in [0, 1] and the best method on both reaches 2. The index is only
meaningful inside its group: adding or removing a method changes everyone's value.
(ours) When all methods share one FID (or one CLIP), that term carries no ranking and
counts 0 for every method; a method without an FID or CLIP has no VLHI (None).
"""

from __future__ import annotations

from collections.abc import Mapping


def _normalised(values: Mapping[str, float], higher_is_better: bool) -> dict[str, float]:
    low, high = min(values.values()), max(values.values())
    if high == low:
        return dict.fromkeys(values, 0.0)
    if higher_is_better:
        return {k: (v - low) / (high - low) for k, v in values.items()}
    return {k: (high - v) / (high - low) for k, v in values.items()}


def vlhi(fid: Mapping[str, float | None], clip: Mapping[str, float | None]) -> dict[str, float | None]:
    """VLHI of every method in the group (keys: method names) from its FID and CLIP score."""
    if set(fid) != set(clip):
        raise ValueError(f"FID and CLIP cover different methods: {sorted(fid)} vs {sorted(clip)}")
    complete = [k for k in fid if fid[k] is not None and clip[k] is not None]
    result: dict[str, float | None] = dict.fromkeys(fid)
    if not complete:
        return result
    fid_term = _normalised({k: float(fid[k]) for k in complete}, higher_is_better=False)
    clip_term = _normalised({k: float(clip[k]) for k in complete}, higher_is_better=True)
    for key in complete:
        result[key] = fid_term[key] + clip_term[key]
    return result
