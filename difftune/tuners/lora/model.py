"""The LoRA baseline, backed by peft so it is exactly what diffusers users train.

The tensors keep peft's key layout (``<module>.lora_A.weight``); with the component
prefix the API adds (``unet.`` / ``transformer.``) and the ``lora_adapter_metadata``
header entry, the file is a diffusers LoRA file that ``pipe.load_lora_weights`` reads,
conv layers included (diffusers' own key conversion breaks mixed attention+conv files,
so we do not convert).

Several LoRA adapters on one layer are peft's named adapters of one peft layer (the difftune
adapter's name is the peft adapter's), summed by peft's forward, each at its own scale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import DifftuneError
from ..base import Adapter
from ..peft import stacking
from .config import LoraConfig


class LoraAdapter(Adapter):
    method = "lora"
    config_class = LoraConfig
    supported_layers = (nn.Linear, nn.Conv2d)
    supported_description = "Linear and Conv2d layers"
    diffusers_lora_file = True
    quantized_base_refusal = None  # peft's LoRA has bitsandbytes layers
    one_step_defaults: ClassVar[dict[str, Any]] = {"rank": 16}  # about HiPA's 3.3M parameters on SD 1.5

    config: LoraConfig

    def _peft_config(self):
        """peft's config of this adapter (``target_modules``: the targets' own names)."""
        from peft import LoraConfig as PeftLoraConfig

        cfg = self.config
        return PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.effective_alpha,
            lora_dropout=cfg.dropout,
            init_lora_weights=cfg.init,
            use_dora=cfg.use_dora,
            use_rslora=cfg.use_rslora,
            target_modules=list(self.target_names),
        )

    def attach(self, modules: dict[str, nn.Module]) -> None:
        stacking.check_adapter_name(self.model, self.name)
        self._originals: dict[str, torch.Tensor] = {}
        self.layers = stacking.inject(self.model, self._peft_config(), self.target_names, self.name,
                                      self.method, shareable=True)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, layer in self.layers.items():
            for pname, param in layer.named_parameters():
                ours = f".{self.name}." in f".{pname}." and not pname.startswith("base_layer.")
                if "lora_" in pname and ours and param.requires_grad:
                    yield f"{name}.{pname}", param

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return stacking.peft_state_dict(self.model, self.name)

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        stacking.load_peft_state_dict(self.model, self.name, tensors, source)

    def _apply_scale(self, scale: float) -> None:
        for layer in self.layers.values():
            layer.set_scale(self.name, scale)

    @torch.no_grad()
    def merged_and_base_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """peft's own merge of this one layer (DoRA's magnitude included), then its base weight back."""
        layer = self.layers.get(name.removesuffix(".weight"))
        if layer is None or self.merged or not name.endswith(".weight"):
            return None
        weight = layer.get_base_layer().weight
        base = weight.detach().clone()
        layer.merge(adapter_names=[self.name])
        merged = weight.detach().clone()
        layer.unmerge()
        weight.data.copy_(base)  # peft subtracts ΔW again, which can be off by rounding
        return merged, base

    @torch.no_grad()
    def _merge(self, keep_original: bool) -> None:
        for name, layer in self.layers.items():
            if keep_original:
                self._originals[name] = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[self.name])

    @torch.no_grad()
    def _unmerge(self) -> None:
        for name, layer in self.layers.items():
            layer.unmerge()
            # peft subtracts ΔW again, which can be off by rounding: restore exactly.
            layer.get_base_layer().weight.data.copy_(self._originals.pop(name))

    def _detach(self) -> None:
        stacking.remove(self.model, self.target_names, self.name)
        self.layers = {}

    def mark_merged(self, merged: bool) -> None:
        stacking.mark_merged(self.layers, self.name, merged)

    def extra_header(self, component: str) -> dict[str, str]:
        """diffusers reads rank/alpha from here, so alpha != rank survives reloading."""
        peft_dict = self._peft_config().to_dict()
        packed = {f"{component}.{k}": sorted(v) if isinstance(v, set) else v
                  for k, v in peft_dict.items()}
        return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True, default=str)}

    @classmethod
    def exact_lora_refusal(cls, config: Mapping[str, Any]) -> str | None:
        return "a DoRA adapter has no exact kohya LoRA form" if config.get("use_dora") else None

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """The trained factors (peft's ``<module>.lora_A.weight`` / ``lora_B``) as other tools' LoRA files
        hold them. peft scales by alpha/rank (alpha/√rank with rsLoRA); those files always scale by
        alpha/rank, so rsLoRA's alpha is written as alpha·√rank. Keeping the trained alpha (instead of
        alpha = rank, what diffusers' ``convert_state_dict_to_kohya`` writes) keeps the strength exact."""
        state, cfg = self.adapter_state_dict(), self.config
        if any(".lora_magnitude_vector" in key for key in state):
            raise DifftuneError("a DoRA adapter has no exact kohya LoRA form; export it with --rank or "
                                "--energy")
        alpha = cfg.effective_alpha * math.sqrt(cfg.rank) if cfg.use_rslora else cfg.effective_alpha
        modules = sorted({key.rsplit(".lora_A.", 1)[0] for key in state if ".lora_A." in key})
        return {m: (state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"], alpha) for m in modules}
