"""Which modules an adapter attaches to: named presets and regular expressions.

A target spec is a preset name, a regular expression (matched with ``re.fullmatch``
against module names as ``model.named_modules()`` gives them), an exact module name,
or a list of these (their union). Only modules that own parameters directly are
candidates, so containers such as ``attn1`` or ``to_out`` never match by accident.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from torch import nn

from .errors import TargetError

# The generic part of each preset: diffusers' Attention projections and FeedForward layers, which
# every denoiser shares. Model families add their own layers (`add_preset_term`, called when a
# family registers): joint-attention projections, MLPs of their own, a UNet's convolutions.
_GENERIC_TERMS: dict[str, tuple[str, ...]] = {
    "attn": (r"to_q|to_k|to_v|to_out\.0",),
    "attn-ff": (r"ff\.net\.(0\.proj|2)",),
    "conv": (),
    "all": (r".*",),
}
# attn-ff is attn plus the feed-forward layers
_EXTENDS = {"attn-ff": "attn"}
_GENERIC_DESCRIPTIONS: dict[str, str] = {
    "attn": "to_q, to_k, to_v, to_out.0 of every attention",
    "attn-ff": "attn + feed-forward ff.net.0.proj, ff.net.2",
    "conv": "convolutions of the model family",
    "all": "every Linear and Conv2d layer of the denoiser",
}
# Layer types `all` and the `conv` preset stand for.
_PRESET_LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "attn": (nn.Linear,),
    "attn-ff": (nn.Linear,),
    "conv": (nn.Conv2d,),
    "all": (nn.Linear, nn.Conv2d),
}
PRESETS = tuple(_GENERIC_TERMS)


@dataclasses.dataclass
class _Term:
    """A family's addition to a preset: a regex alternative on the end of module names, what it
    selects (for the description) and the families that declare it."""

    label: str
    owners: list[str] = dataclasses.field(default_factory=list)


_FAMILY_TERMS: dict[str, dict[str, _Term]] = {name: {} for name in PRESETS}


def add_preset_term(preset: str, pattern: str, label: str, owner: str) -> None:
    """Let ``preset`` also select modules whose names end in ``pattern`` (a regex alternative);
    ``label`` says which layers that is and ``owner`` (a model family's title) whose they are."""
    if preset not in _FAMILY_TERMS:
        raise TargetError(f"{owner}: unknown target preset '{preset}' (presets: {', '.join(PRESETS)})")
    term = _FAMILY_TERMS[preset].setdefault(pattern, _Term(label))
    if owner not in term.owners:
        term.owners.append(owner)


def _terms(preset: str) -> list[str]:
    inherited = _terms(_EXTENDS[preset]) if preset in _EXTENDS else []
    return [*inherited, *_GENERIC_TERMS[preset], *_FAMILY_TERMS[preset]]


def preset_pattern(preset: str) -> str:
    """The regex a preset stands for (fullmatched against module names)."""
    return rf"(.*\.)?({'|'.join(_terms(preset))})"


def preset_description(preset: str) -> str:
    """What a preset selects, with what each model family adds to it."""
    additions = [f"{term.label} on {' and '.join(term.owners)}" for term in _FAMILY_TERMS[preset].values()]
    text = _GENERIC_DESCRIPTIONS[preset]
    return f"{text} (+ {'; '.join(additions)})" if additions else text


WRAPPED_LAYER = "base_layer"  # the child an adapter layer (difftune's or peft's) holds what it wraps by


def plain_layer(module: nn.Module) -> nn.Module:
    """The model's own layer under any adapter layers wrapped around it (each holds the next as
    ``base_layer``, as peft's tuner layers do)."""
    while isinstance(module._modules.get(WRAPPED_LAYER), nn.Module):
        module = module._modules[WRAPPED_LAYER]
    return module


def layers_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own parameters directly (layers, norms), by name.

    A layer that adapters wrap counts once, under its own name, as the plain layer it is; the
    adapters' inner modules (peft's ``lora_A``, ...) are no candidates: several adapters can then
    target the same layers."""
    layers: dict[str, nn.Module] = {}
    inside: list[str] = []  # wrapper names whose non-chain children are adapter internals
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module._modules.get(WRAPPED_LAYER), nn.Module):
            layers[name] = plain_layer(module)
            inside.append(name + ".")
        elif any(True for _ in module.parameters(recurse=False)):
            layers[name] = module
    return layers


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> dict[str, nn.Module]:
    """Return ``{module_name: module}`` for a target spec, in model order.

    Raises TargetError naming the spec when an entry matches nothing.
    """
    specs = [targets] if isinstance(targets, str) else list(targets)
    if not specs:
        raise TargetError("empty target list: give a preset (attn, attn-ff, conv, all) or a regex")
    layers = layers_by_name(model)
    chosen: set[str] = set()
    for spec in specs:
        if spec in PRESETS:
            pattern = re.compile(preset_pattern(spec))
            kinds = _PRESET_LAYER_TYPES[spec]
            hits = {n for n, m in layers.items() if pattern.fullmatch(n) and isinstance(m, kinds)}
        elif spec in layers:
            hits = {spec}
        else:
            try:
                pattern = re.compile(spec)
            except re.error as err:
                raise TargetError(f"target {spec!r} is neither a preset ({', '.join(PRESETS)}) "
                                  f"nor a valid regular expression: {err}") from None
            hits = {n for n in layers if pattern.fullmatch(n)}
        if not hits:
            raise TargetError(
                f"target {spec!r} matched no layer of {type(model).__name__}. Presets: "
                + "; ".join(f"{k}: {preset_description(k)}" for k in PRESETS)
                + ". A regex must match whole module names, e.g. '.*attn1\\.to_q'."
            )
        chosen |= hits
    return {name: module for name, module in layers.items() if name in chosen}


def check_layer_types(
    method: str, modules: dict[str, nn.Module], supported: tuple[type[nn.Module], ...],
    describe_supported: str,
) -> None:
    """Raise TargetError listing every targeted module a method cannot take."""
    bad = [f"{name} ({type(m).__name__}{_kernel(m)})" for name, m in modules.items()
           if not _is_supported(m, supported)]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise TargetError(f"{method} supports {describe_supported}; it cannot adapt: {shown}. "
                          "Narrow --targets (e.g. 'attn') or pick another method.")


def _is_supported(module: nn.Module, supported: tuple[type[nn.Module], ...]) -> bool:
    return isinstance(module, supported)


def _kernel(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f" {module.kernel_size[0]}x{module.kernel_size[1]}"
    return ""
