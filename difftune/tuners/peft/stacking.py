"""peft's tuner layers in a stack of adapters: where they go, who owns them, how they leave.

A peft tuner layer goes right around the model's layer, inside whatever adapter layers are there
already (each adds its update to what it wraps, so the order does not change the sum). Several
``lora`` adapters share one peft LoRA layer as peft's named adapters (peft sums their outputs, each
at its own scale); any other peft adapter gets a layer of its own. Each peft layer records which
difftune adapter owns each of its peft adapters (``_difftune_owners``), so an adapter of another
method is never folded into a layer whose forward would then mix the two.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ...errors import DifftuneError
from ...targeting import WRAPPED_LAYER
from ..base import check_tensor_names, layer_chain, replace_module, strip_wrapped_names, unwrap_layer
from .catalog import forget_peft_config

OWNERS = "_difftune_owners"


def check_adapter_name(model: nn.Module, name: str) -> None:
    """peft writes a state dict's keys by removing ``.<adapter name>`` from them: refuse a name that
    also reads as part of a module name there (e.g. ``proj``), or that is no identifier."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise DifftuneError(f"adapter name {name!r}: use letters, digits and underscores")
    clash = next((module for module, _ in model.named_modules() if f".{name}" in f".{module}"), None)
    if clash is not None:
        raise DifftuneError(f"adapter name {name!r} is also part of the module name '{clash}', which peft's "
                            "files cannot tell apart: choose another name")


def peft_state_dict(model: nn.Module, name: str, **options: Any) -> dict[str, torch.Tensor]:
    """peft's state dict of adapter ``name``, keyed by the layers' own names (under other adapters'
    layers too), as a file holds it."""
    from peft import get_peft_model_state_dict

    return {strip_wrapped_names(key): value
            for key, value in get_peft_model_state_dict(model, adapter_name=name, **options).items()}


@torch.no_grad()
def load_peft_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str,
                         **options: Any) -> None:
    """Load a file's tensors (keyed as `peft_state_dict` writes them) into adapter ``name``."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    in_model = {strip_wrapped_names(key): key
                for key in get_peft_model_state_dict(model, adapter_name=name, **options)}
    check_tensor_names(dict.fromkeys(in_model), tensors, source)
    set_peft_model_state_dict(model, {in_model[key]: value for key, value in tensors.items()},
                              adapter_name=name)


def owners(layer: nn.Module) -> dict[str, str]:
    return layer.__dict__.setdefault(OWNERS, {})


def activate_all(layer: Any) -> None:
    """Make every peft adapter of a layer active (difftune switches adapters by their scale), keeping
    each tensor's requires_grad (peft's set_adapter would make every active adapter trainable)."""
    before = {id(param): param.requires_grad for name, param in layer.named_parameters()
              if not name.startswith("base_layer.")}
    layer.set_adapter(list(owners(layer)))
    for name, param in layer.named_parameters():
        if id(param) in before and not name.startswith("base_layer."):
            param.requires_grad_(before[id(param)])


def _peft_target(model: nn.Module, name: str, method: str, shareable: bool) -> nn.Module:
    """What peft is handed for the layer at ``name``: the peft layer right around the model's layer when
    the adapter can join it (one of ``method``'s adapters only: peft adds a named adapter to it), else
    the model's layer itself (peft wraps it, and the new peft layer goes in right around it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    chain = layer_chain(model, name)
    inner = chain[-2] if len(chain) > 1 else None
    held = inner.__dict__.get(OWNERS, {}) if isinstance(inner, BaseTunerLayer) else {}
    if shareable and held and all(each == method for each in held.values()):
        return inner
    return chain[-1]


def inject(model: nn.Module, peft_config: Any, names: list[str], adapter_name: str, method: str,
           shareable: bool) -> dict[str, Any]:
    """Inject ``peft_config`` as peft adapter ``adapter_name`` at each target ``names`` (by their own
    names), right around the model's layer; returns the peft layer that holds it, by target name.

    peft does not reach into its own layers, so it is given the targets in a holder module and each new
    layer is put in the chain by hand. ``shareable``: the adapter joins a peft layer of ``method``'s
    own adapters (peft then sums them); otherwise it gets a layer of its own."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = {name: _peft_target(model, name, method, shareable) for name in names}
    holder = nn.Module()
    for index, name in enumerate(names):
        holder.add_module(f"target_{index}", targets[name])
    peft_config.target_modules = [f"target_{index}" for index in range(len(names))]
    inject_adapter_in_model(peft_config, holder, adapter_name=adapter_name)
    layers: dict[str, Any] = {}
    for index, name in enumerate(names):
        old, new = targets[name], holder._modules[f"target_{index}"]
        if new is not old:  # a new peft layer around the model's layer: put it where that was
            chain = layer_chain(model, name)
            if chain[0] is old:
                replace_module(model, name, new)
            else:
                setattr(chain[chain.index(old) - 1], WRAPPED_LAYER, new)
        layers[name] = new
        if isinstance(new, BaseTunerLayer):
            owners(new)[adapter_name] = method
            if new is old:
                activate_all(new)
    config = holder.__dict__["peft_config"][adapter_name]
    config.target_modules = set(names)  # as the layers are named in the model
    model.__dict__.setdefault("peft_config", {})[adapter_name] = config
    return layers


def holding_layer(model: nn.Module, name: str, adapter_name: str) -> Any | None:
    """The peft layer in the chain at ``name`` that holds peft adapter ``adapter_name``, if any."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in layer_chain(model, name)[:-1]:
        if isinstance(layer, BaseTunerLayer) and (
                adapter_name in layer.__dict__.get(OWNERS, {})
                or any(adapter_name in getattr(layer, attr, {}) for attr in layer.adapter_layer_names)):
            return layer
    return None


def remove(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Take peft adapter ``adapter_name`` out of the layers at ``names`` (wherever it got to, after a
    partial attach too): a layer it shares keeps the others, a layer of its own leaves the chain."""
    for name in names:
        layer = holding_layer(model, name, adapter_name)
        if layer is None:
            continue
        held = owners(layer)
        held.pop(adapter_name, None)
        if held:
            layer.delete_adapter(adapter_name)
            activate_all(layer)
        else:
            unwrap_layer(model, name, layer)
    forget_peft_config(model, adapter_name)


def mark_merged(layers: dict[str, Any], adapter_name: str, merged: bool) -> None:
    """Tell peft's layers that this adapter's update is in the weights (they then pass through), or no
    longer: a merge of several adapters writes the weights itself."""
    for layer in layers.values():
        held = layer.merged_adapters
        if merged and adapter_name not in held:
            held.append(adapter_name)
        elif not merged and adapter_name in held:
            held.remove(adapter_name)
