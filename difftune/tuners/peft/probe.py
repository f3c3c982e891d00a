"""Can a peft tuner take a kind of layer? Found by trying it on a stand-in layer, not from a list.

peft's tuners differ in what they wrap (SHiRA and Super-Tuning only Linear, LoHa/LoKr/OFT also
Conv2d, some skip a type silently) and, for some layer kinds, in whether their forward agrees with
their own merge (peft 0.21's OFT rotates the unfolded patches of a k×k convolution and folds them
back by overlap-add, which is neither the base output at initialisation nor the merged kernel). So
for each kind of targeted layer (class, kernel, groups) the probe builds one fresh layer of that
kind, at the shape of the smallest targeted one, and checks on it that the tuner

1. wraps it (peft raises or skips otherwise),
2. leaves its base weight and bias untouched (some initialisations rewrite W0, which remove could
   not undo and which a fresh base would not share),
3. gives the same output merged as unmerged once its parameters are moved off their initial values.

The stand-in is random and on the CPU, so a meta-device model (a trainer's check before loading
weights) is probed the same way; the global random state is left as it was.
"""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

import torch
from torch import nn

from ...errors import TargetError
from .catalog import ADAPTER_NAME

# merged and unmerged outputs of the stand-in may differ by this much relative to the output's size
MERGE_TOLERANCE = 1e-3
PERTURBATION = 0.05  # std of the noise added to the tuner's parameters before comparing


def layer_kind(module: nn.Module) -> tuple:
    """What decides whether a tuner can take a layer: its class, and a conv's kernel and groups."""
    if isinstance(module, nn.Conv2d):
        return ("Conv2d", tuple(module.kernel_size), module.groups > 1)
    return (type(module).__name__,)


def describe_kind(kind: tuple) -> str:
    if kind[0] == "Conv2d":
        text = f"Conv2d {kind[1][0]}x{kind[1][1]}"
        return text + (" (grouped)" if kind[2] else "")
    return kind[0]


def check_layer_kinds(config: Any, modules: dict[str, nn.Module]) -> None:
    """Refuse, naming every targeted module of the failing kinds, what the tuner cannot take faithfully."""
    groups: dict[tuple, list[str]] = {}
    for name, module in modules.items():
        groups.setdefault(layer_kind(module), []).append(name)
    options = json.dumps(config.peft_kwargs(), sort_keys=True, default=str)
    problems = []
    for kind, names in groups.items():
        smallest = min(names, key=lambda n: modules[n].weight.numel())
        reason = probe(config.type, options, _shape_of(modules[smallest]))
        if reason is not None:
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            problems.append(f"{describe_kind(kind)} layers ({reason}): {shown}")
    if problems:
        raise TargetError(f"peft type '{config.type}' cannot adapt " + "; ".join(problems)
                          + ". Narrow --targets (e.g. 'attn') or pick another --peft_type.")


def _shape_of(module: nn.Module) -> tuple:
    """A hashable description of the layer's construction arguments."""
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return ("Linear", module.in_features, module.out_features, has_bias)
    return ("Conv2d", module.in_channels, module.out_channels, tuple(module.kernel_size),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation), module.groups, has_bias)


def _stand_in(shape: tuple) -> tuple[nn.Module, torch.Tensor]:
    if shape[0] == "Linear":
        _, features_in, features_out, bias = shape
        return nn.Linear(features_in, features_out, bias=bias), torch.randn(2, features_in)
    _, channels_in, channels_out, kernel, stride, padding, dilation, groups, bias = shape
    layer = nn.Conv2d(channels_in, channels_out, kernel, stride, padding, dilation, groups, bias)
    side = max(dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)) + 2 * max(stride) + 2
    return layer, torch.randn(1, channels_in, side, side)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


@functools.lru_cache(maxsize=64)
def probe(type_name: str, options: str, shape: tuple) -> str | None:
    """None when the tuner takes a layer of ``shape`` faithfully, else the reason in a few words."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .catalog import build_peft_config

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        layer, x = _stand_in(shape)
        holder = _Holder(layer)
        originals = {name: tensor.detach().clone() for name, tensor in layer.named_parameters()}
        peft_config = build_peft_config(type_name, json.loads(options), target_modules="layer")
        try:
            inject_adapter_in_model(peft_config, holder, adapter_name=ADAPTER_NAME)
        except Exception as err:  # peft's refusals are ValueError, TypeError, NotImplementedError, ...
            return f"peft refuses it: {str(err).splitlines()[0][:240]}"
        wrapped = holder.layer
        if not isinstance(wrapped, BaseTunerLayer):
            return "peft leaves it unwrapped"
        base = wrapped.get_base_layer()
        if any(not torch.equal(getattr(base, name), value) for name, value in originals.items()):
            return "its initialisation rewrites the base weights"
        with torch.no_grad():
            for name, param in wrapped.named_parameters():
                if param.requires_grad and not name.startswith("base_layer."):
                    param.add_(torch.randn_like(param) * PERTURBATION)
            wrapped.eval()
            try:
                unmerged = wrapped(x)
                wrapped.merge(adapter_names=[ADAPTER_NAME])
                merged = wrapped(x)
            except Exception as err:
                return f"peft fails on it: {str(err).splitlines()[0][:240]}"
        gap = float((merged - unmerged).abs().max())
        size = float(unmerged.abs().max()) + 1.0
        if not gap <= MERGE_TOLERANCE * size:
            return f"peft's merged layer differs from its unmerged forward by {gap:.3g}"
    return None
