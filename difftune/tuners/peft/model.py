"""The ``peft`` method: a peft tuner injected into the targeted layers, held to difftune's contract.

peft builds and runs the layers (`peft.inject_adapter_in_model` with the exact targeted names);
difftune adds what peft's tuners do not share:

* one meaning of scale for every tuner: at scale α a layer computes (W0 + α·ΔW)·x + b with
  ΔW = W_merged − W0, whatever the tuner (additive like LoHa, multiplicative like OFT, DoRA's
  norm), so 0 is the base model bit for bit and merging at α gives the same output;
* merge keeps the exact base tensors and unmerge puts them back (peft's unmerge subtracts or
  inverts again, off by rounding: OFT inverts a rotation);
* files: peft's own state dict (`get_peft_model_state_dict`) under difftune's header, checksum
  and base fingerprint, with the resolved peft config in the header for reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...errors import TargetError
from ..base import Adapter, AdapterConfig
from . import catalog, stacking
from .config import PeftMethodConfig
from .probe import check_layer_kinds, describe_kind, layer_kind


def exact_names_pattern(names: list[str]) -> str:
    """A regex peft fullmatches against module names that selects exactly ``names``."""
    return "(" + "|".join(re.escape(name) for name in names) + ")"


class PeftAdapter(Adapter):
    method = "peft"
    config_class = PeftMethodConfig
    supported_layers = (nn.Linear, nn.Conv2d)
    supported_description = "Linear and Conv2d layers (those the chosen peft type takes)"

    config: PeftMethodConfig

    @classmethod
    def check_targets(cls, modules: dict[str, nn.Module], config: AdapterConfig | None = None) -> None:
        super().check_targets(modules, config)
        if config is not None:
            check_layer_kinds(config, modules)

    def attach(self, modules: dict[str, nn.Module]) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        stacking.check_adapter_name(self.model, self.name)
        self.layers: dict[str, Any] = {}
        self._originals: dict[str, dict[str, torch.Tensor]] = {}
        self._scale_hooks: list[Any] = []
        self.peft_config = self.config.peft_config(exact_names_pattern(self.target_names))
        try:
            self.layers = stacking.inject(self.model, self.peft_config, self.target_names, self.name,
                                          self.method, shareable=False)
        except TargetError:
            raise
        except Exception as err:
            culprit = next((name for name in self.target_names
                            if stacking.holding_layer(self.model, name, self.name) is None), None)
            where = f" module '{culprit}' ({describe_kind(layer_kind(modules[culprit]))})" if culprit else ""
            raise TargetError(f"peft's {self.config.type} could not adapt{where}: "
                              f"{str(err).splitlines()[0]}") from None
        skipped = [name for name, layer in self.layers.items() if not isinstance(layer, BaseTunerLayer)]
        if skipped:
            raise TargetError(f"peft's {self.config.type} left {len(skipped)} targeted module(s) unwrapped: "
                              f"{', '.join(skipped[:6])}. Narrow --targets or pick another --peft_type.")

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, layer in self.layers.items():
            for pname, param in layer.named_parameters():
                if param.requires_grad and not pname.startswith("base_layer."):
                    yield f"{name}.{pname}", param

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return stacking.peft_state_dict(self.model, self.name, save_embedding_layers=False)

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        stacking.load_peft_state_dict(self.model, self.name, tensors, source, save_embedding_layers=False)

    def file_metadata(self) -> dict[str, Any]:
        """The peft version and the resolved peft config (e.g. OFT's adjusted block size), for reference."""
        import peft

        resolved = {key: value for key, value in self.peft_config.to_dict().items()
                    if key != "target_modules"}
        return {"peft_version": peft.__version__, "peft_config": resolved}

    def changed_tensor_names(self) -> list[str]:
        names = super().changed_tensor_names()
        if catalog.changes_bias(self.peft_config):
            names += [f"{name}.bias" for name, layer in self.layers.items()
                      if getattr(layer.get_base_layer(), "bias", None) is not None]
        return names

    # --- scale, merge, remove ----------------------------------------------------------

    def _apply_scale(self, scale: float) -> None:
        for hook in self._scale_hooks:
            hook.remove()
        self._scale_hooks = []
        if scale != 1.0:
            self._scale_hooks = [layer.register_forward_hook(_scaled_output(scale), with_kwargs=True)
                                 for layer in self.layers.values()]

    @torch.no_grad()
    def _merge_layer(self, layer: Any) -> dict[str, torch.Tensor]:
        """Merge one peft layer at the current scale; returns its base tensors as they were."""
        base = layer.get_base_layer()
        before = {attr: getattr(base, attr).detach().clone() for attr in ("weight", "bias")
                  if getattr(base, attr, None) is not None}
        layer.merge(adapter_names=[self.name])
        if self.effective_scale != 1.0:  # W0 + α·(W1 − W0), from peft's merge at scale 1
            for attr, original in before.items():
                tensor = getattr(base, attr)
                wide = torch.promote_types(tensor.dtype, torch.float32)
                value = original.to(wide) + self.effective_scale * (tensor.to(wide) - original.to(wide))
                tensor.data.copy_(value.to(tensor.dtype))
        return before

    @staticmethod
    @torch.no_grad()
    def _restore_layer(layer: Any, before: dict[str, torch.Tensor]) -> None:
        base = layer.get_base_layer()
        for attr, original in before.items():
            getattr(base, attr).data.copy_(original)
        # the exact tensors are back: peft only needs to forget that it merged (its own unmerge
        # would subtract or invert ΔW again, costly for OFT and off by rounding)
        layer.merged_adapters.clear()

    @torch.no_grad()
    def _merge(self, keep_original: bool) -> None:
        for name, layer in self.layers.items():
            before = self._merge_layer(layer)
            if keep_original:
                self._originals[name] = before

    @torch.no_grad()
    def merged_and_base_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        module, _, attr = name.rpartition(".")
        layer = self.layers.get(module)
        if layer is None or self.merged or attr not in ("weight", "bias"):
            return None
        before = self._merge_layer(layer)
        merged = getattr(layer.get_base_layer(), attr).detach().clone()
        self._restore_layer(layer, before)
        return merged, before[attr]

    def _unmerge(self) -> None:
        for name, layer in self.layers.items():
            self._restore_layer(layer, self._originals.pop(name))

    def _detach(self) -> None:
        self._apply_scale(1.0)
        stacking.remove(self.model, self.target_names, self.name)
        self.layers = {}

    def mark_merged(self, merged: bool) -> None:
        stacking.mark_merged(self.layers, self.name, merged)


def _scaled_output(scale: float):
    """A forward hook making an unmerged peft layer output inner + scale·(adapted − inner), ``inner``
    what the layer wraps (the model's layer, or other adapters' layers around it)."""

    def hook(layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        if layer.merged:
            return output
        base = layer.base_layer(*args, **kwargs)
        return base + scale * (output - base)

    return hook
