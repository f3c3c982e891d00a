"""Several named adapters on one module: where they are kept, their merge as a set, and the set seen
as one adapter (what exports read).

The module computes W0 + Σ wᵢ·ΔWᵢ over its active adapters, wᵢ each adapter's scale and ΔWᵢ its own
update relative to W0: layer-wrapping adapters nest (`tuners.base.layer_chain`), each adding its
update to what the layers inside it compute; SaRA adapters hold theirs in the base tensors, summed
where several overlap (`sparse_backprop`). A merge writes W0 + Σ wᵢ·ΔWᵢ into the base tensors at
once, every ΔWᵢ computed before anything is written, and keeps the tensors it replaced, so an unmerge
puts them back bit for bit.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from .errors import DifftuneError
from .sparse_backprop import base_tensor
from .targeting import plain_layer
from .tuners import Adapter

_ADAPTERS = "_difftune_adapters"  # {name: Adapter} on the module, in the order they were attached
_MERGED = "_difftune_merged_set"  # [(tensor, value before the merge)] while a set is merged
_BASE_FLAGS = "_difftune_base_requires_grad"  # the base tensors' requires_grad before the first adapter


def adapters_on(module: nn.Module) -> dict[str, Adapter]:
    """The adapters attached to ``module`` by name (empty when none)."""
    return module.__dict__.get(_ADAPTERS, {})


def register(module: nn.Module, adapter: Adapter, base_flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Keep ``adapter`` on ``module``; ``base_flags`` (the tensors' requires_grad before it froze them)
    are kept from the first adapter, to restore when the last one leaves."""
    if not adapters_on(module):
        module.__dict__[_BASE_FLAGS] = base_flags
    module.__dict__.setdefault(_ADAPTERS, {})[adapter.name] = adapter


def unregister(module: nn.Module, adapter: Adapter) -> None:
    """Forget ``adapter``; when it was the last one, the base tensors' requires_grad flags are restored."""
    adapters = module.__dict__[_ADAPTERS]
    del adapters[adapter.name]
    if not adapters:
        del module.__dict__[_ADAPTERS]
        for param, flag in module.__dict__.pop(_BASE_FLAGS, []):
            param.requires_grad_(flag)


def is_merged_set(module: nn.Module) -> bool:
    return _MERGED in module.__dict__


def content_id(adapter: Adapter) -> str:
    """SHA-256 of an adapter's method and file tensors: what a file trained on top of it records, to
    tell on load whether the same adapter is attached (`base_adapter_warnings`)."""
    digest = hashlib.sha256(adapter.method.encode())
    tensors = adapter.adapter_state_dict()
    for key in sorted(tensors):
        value = tensors[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"|{key}|{list(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_adapter_records(module: nn.Module, trained: Adapter) -> list[dict[str, Any]]:
    """What a file of ``trained`` records of the frozen adapters it was trained on top of."""
    return [{"name": adapter.name, "method": adapter.method, "weight": adapter.effective_scale,
             "source": adapter.source, "content": content_id(adapter)}
            for adapter in adapters_on(module).values() if adapter.frozen and adapter is not trained]


def base_adapter_warnings(module: nn.Module, records: list[dict[str, Any]], source: str) -> list[str]:
    """One line for each adapter a file was trained on top of that ``module`` does not hold now at the
    weight it was trained with."""
    present = {content_id(adapter): adapter for adapter in adapters_on(module).values()}
    lines = []
    for record in records:
        what = f"the {record['method']} adapter {record['source'] or record['name']!r}"
        adapter = present.get(record["content"])
        if adapter is None:
            lines.append(f"{source}: was trained on top of {what} at weight {record['weight']:g}, which is "
                         "not attached: load it first (difftune.load_adapter(pipe, path, adapter_name=..., "
                         f"scale={record['weight']:g})) for the result it was trained for")
        elif abs(adapter.effective_scale - float(record["weight"])) > 1e-6:
            lines.append(f"{source}: was trained on top of {what} at weight {record['weight']:g}; it is "
                         f"attached as '{adapter.name}' at weight {adapter.effective_scale:g}")
    return lines


def _parameter(module: nn.Module, name: str) -> nn.Parameter:
    """A base tensor by its own name (``<layer>.weight``), under any adapter layers around its layer."""
    owner, _, attribute = name.rpartition(".")
    return plain_layer(module.get_submodule(owner))._parameters[attribute]


def _updates(module: nn.Module, adapters: list[Adapter]) -> dict[int, tuple[nn.Parameter, torch.Tensor]]:
    """Σ wᵢ·ΔWᵢ (float32) per base tensor over ``adapters`` that are not in the tensors already."""
    sums: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    for adapter in adapters:
        if adapter.writes_base_tensors or adapter.effective_scale == 0.0:
            continue
        for name in adapter.changed_tensor_names():
            pair = adapter.merged_and_base_tensor(name)
            if pair is None:
                raise DifftuneError(f"the {adapter.method} adapter '{adapter.name}' merges only on its own: "
                                    "merge it alone, or remove the others first")
            merged, base = pair
            param = _parameter(module, name)
            update = merged.float() - base.float()
            if id(param) in sums:
                update = sums[id(param)][1] + update
            sums[id(param)] = (param, update)
    return sums


@torch.no_grad()
def merge_set(module: nn.Module, keep_original: bool) -> None:
    """Write W0 + Σ wᵢ·ΔWᵢ of the module's active adapters into its base tensors; with
    ``keep_original`` the replaced tensors are kept for `unmerge_set`."""
    adapters = list(adapters_on(module).values())
    sums = _updates(module, adapters)
    originals = []
    for param, update in sums.values():
        if keep_original:
            originals.append((param, param.detach().clone()))
        param.copy_((param.detach().float() + update).to(param.dtype))
    for adapter in adapters:
        adapter.mark_merged(True)
    module.__dict__[_MERGED] = originals if keep_original else None


@torch.no_grad()
def unmerge_set(module: nn.Module) -> None:
    """Put back the tensors `merge_set` replaced, bit for bit; the adapters compute again."""
    originals = module.__dict__.pop(_MERGED)
    if originals is None:
        raise DifftuneError("the adapters were merged without keeping the original weights")
    for param, original in originals:
        param.copy_(original)
    for adapter in adapters_on(module).values():
        adapter.mark_merged(False)


class AdapterSet:
    """The active adapters of a module seen as one adapter with ΔW = Σ wᵢ·ΔWᵢ: what an export reads
    (its changed tensors one at a time, or exact LoRA factors when every adapter has them)."""

    def __init__(self, module: nn.Module):
        self.model = module
        self.adapters = [adapter for adapter in adapters_on(module).values() if adapter.active]
        self.method = "+".join(adapter.method for adapter in self.adapters)
        self.merged = False

    def changed_tensor_names(self) -> list[str]:
        names: dict[str, None] = {}
        for adapter in self.adapters:
            names.update(dict.fromkeys(adapter.changed_tensor_names()))
        return list(names)

    @torch.no_grad()
    def merged_and_base_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W0 + Σ wᵢ·ΔWᵢ, W0) of one base tensor, the model left as it is."""
        param = _parameter(self.model, name)
        owner, _, attribute = name.rpartition(".")
        total = param.detach().float()  # W0 and the updates already in the tensor (SaRA's)
        for adapter in self.adapters:
            if adapter.writes_base_tensors or name not in adapter.changed_tensor_names():
                continue
            pair = adapter.merged_and_base_tensor(name)
            if pair is None:
                return None
            total = total + (pair[0].float() - pair[1].float())
        base = base_tensor(plain_layer(self.model.get_submodule(owner)), attribute)
        return total.to(param.dtype), base.detach()

    def exact_lora_refusal(self, config: Any = None) -> str | None:
        return next((refusal for adapter in self.adapters
                     if (refusal := adapter.exact_lora_refusal(adapter.config.to_dict()))), None)

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Each layer's LoRA pairs side by side, each up factor carrying its adapter's wᵢ·alphaᵢ/rankᵢ:
        ΔW = Σ wᵢ·alphaᵢ/rankᵢ·upᵢ·downᵢ exactly, as one LoRA of the summed rank (alpha = that rank)."""
        refusal = self.exact_lora_refusal()
        if refusal:
            raise DifftuneError(refusal)
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for adapter in self.adapters:
            for module, (down, up, alpha) in adapter.lora_factors().items():
                weight = adapter.effective_scale * alpha / down.shape[0]
                pairs.setdefault(module, []).append((down.float(), up.float() * weight))
        factors = {}
        for module, parts in pairs.items():
            down = torch.cat([d for d, _ in parts])
            up = torch.cat([u for _, u in parts], dim=1)
            factors[module] = (down, up, float(down.shape[0]))
        return factors
