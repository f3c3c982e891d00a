"""Which modules an adapter attaches to: named presets and regular expressions.

A target spec is a preset name, a regular expression (matched with ``re.fullmatch``
against module names as ``model.named_modules()`` gives them), an exact module name,
or a list of these (their union). Only modules that own parameters directly are
candidates, so containers such as ``attn1`` or ``to_out`` never match by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .errors import TargetError

# Attention projections: UNet attn1/attn2, DiT attn, and SD3's / Flux's joint-attention extras.
_ATTENTION = r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
# Feed-forward: UNet/DiT/SD3/Flux-joint ``ff``/``ff_context``, and Flux single blocks' parallel
# MLP (``proj_mlp`` in, ``proj_out`` out; its input also carries the attention output).
_FEED_FORWARD = r"((ff|ff_context)\.net\.(0\.proj|2)|single_transformer_blocks\.\d+\.(proj_mlp|proj_out))"
_RESNET_CONV = r"resnets\.\d+\.(conv1|conv2|conv_shortcut)"
_PROJECTION = r"(proj_in|proj_out)"

PRESETS: dict[str, str] = {
    "attn": rf"(.*\.)?{_ATTENTION}",
    "attn-ff": rf"(.*\.)?({_ATTENTION}|{_FEED_FORWARD})",
    "conv": rf"(.*\.)?({_RESNET_CONV}|attentions\.\d+\.{_PROJECTION})",
    "all": r".*",
}
PRESET_DESCRIPTIONS: dict[str, str] = {
    "attn": "to_q, to_k, to_v, to_out.0 of every attention (+ add_q/k/v_proj, to_add_out on SD3 "
            "and Flux joint blocks; Flux single blocks have to_q/k/v only)",
    "attn-ff": "attn + feed-forward ff.net.0.proj, ff.net.2 (and ff_context on SD3/Flux; "
               "proj_mlp, proj_out of Flux single blocks)",
    "conv": "resnet conv1, conv2, conv_shortcut and the 1x1-conv proj_in/proj_out",
    "all": "every Linear and Conv2d layer of the denoiser",
}
# Layer types `all` and the `conv` preset stand for.
_PRESET_LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "attn": (nn.Linear,),
    "attn-ff": (nn.Linear,),
    "conv": (nn.Conv2d,),
    "all": (nn.Linear, nn.Conv2d),
}


def _leaf_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own parameters directly (layers, norms), by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    }


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> dict[str, nn.Module]:
    """Return ``{module_name: module}`` for a target spec, in model order.

    Raises TargetError naming the spec when an entry matches nothing.
    """
    specs = [targets] if isinstance(targets, str) else list(targets)
    if not specs:
        raise TargetError("empty target list: give a preset (attn, attn-ff, conv, all) or a regex")
    layers = _leaf_layers(model)
    chosen: set[str] = set()
    for spec in specs:
        if spec in PRESETS:
            pattern = re.compile(PRESETS[spec])
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
                + "; ".join(f"{k}: {v}" for k, v in PRESET_DESCRIPTIONS.items())
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
