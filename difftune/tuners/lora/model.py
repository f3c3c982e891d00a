"""The LoRA baseline, backed by peft so it is exactly what diffusers users train.

The tensors keep peft's key layout (``<module>.lora_A.weight``); with the component
prefix the API adds (``unet.`` / ``transformer.``) and the ``lora_adapter_metadata``
header entry, the file is a diffusers LoRA file that ``pipe.load_lora_weights`` reads,
conv layers included (diffusers' own key conversion breaks mixed attention+conv files,
so we do not convert).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import DifftuneError
from ..base import Adapter, check_tensor_names, replace_module
from ..peft.catalog import forget_peft_config
from .config import LoraConfig

PEFT_ADAPTER_NAME = "default"


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
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self._peft_config(), self.model, adapter_name=PEFT_ADAPTER_NAME)
        self.layers = {name: self.model.get_submodule(name) for name in self.target_names}
        self._originals: dict[str, torch.Tensor] = {}

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, layer in self.layers.items():
            for pname, param in layer.named_parameters():
                if "lora_" in pname and param.requires_grad:
                    yield f"{name}.{pname}", param

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=PEFT_ADAPTER_NAME)

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        from peft import set_peft_model_state_dict

        check_tensor_names(self.adapter_state_dict(), tensors, source)
        set_peft_model_state_dict(self.model, tensors, adapter_name=PEFT_ADAPTER_NAME)

    def _apply_scale(self, scale: float) -> None:
        for layer in self.layers.values():
            layer.set_scale(PEFT_ADAPTER_NAME, scale)

    @torch.no_grad()
    def merged_and_base_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """peft's own merge of this one layer (DoRA's magnitude included), then its base weight back."""
        layer = self.layers.get(name.removesuffix(".weight"))
        if layer is None or self.merged or not name.endswith(".weight"):
            return None
        weight = layer.get_base_layer().weight
        base = weight.detach().clone()
        layer.merge(adapter_names=[PEFT_ADAPTER_NAME])
        merged = weight.detach().clone()
        layer.unmerge()
        weight.data.copy_(base)  # peft subtracts ΔW again, which can be off by rounding
        return merged, base

    @torch.no_grad()
    def _merge(self, keep_original: bool) -> None:
        for name, layer in self.layers.items():
            if keep_original:
                self._originals[name] = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[PEFT_ADAPTER_NAME])

    @torch.no_grad()
    def _unmerge(self) -> None:
        for name, layer in self.layers.items():
            layer.unmerge()
            # peft subtracts ΔW again, which can be off by rounding: restore exactly.
            layer.get_base_layer().weight.data.copy_(self._originals.pop(name))

    def _detach(self) -> None:
        for name, layer in self.layers.items():
            replace_module(self.model, name, layer.get_base_layer())
        self.layers = {}
        forget_peft_config(self.model, PEFT_ADAPTER_NAME)

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
