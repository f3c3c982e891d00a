"""Import LoRA files made by other tools (kohya sd-scripts, A1111/ComfyUI exports, diffusers, peft)
as a difftune LoRA adapter, so they can be evaluated, scaled, merged or trained further.

diffusers' own loader does the key conversion (kohya and SGM/LDM names, alphas, conv LoRAs):
the file is loaded with ``pipe.load_lora_weights``, the LoRA factors and scales are read back
from the layers it made, and the same modules get a difftune LoRA holding those factors. SD3
files in the kohya form (``lora_transformer_*``, which ComfyUI reads and diffusers does not) are
renamed by the module-name rule first. A file is refused, naming its first unmapped key, unless
every LoRA module in it lands on a module of the model: never a partial load.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..adapter_file import METADATA_KEY, first_non_finite, read_safetensors
from ..errors import AdapterFileError, DifftuneError
from .names import KOHYA_PREFIXES, kohya_module_name

IMPORT_ADAPTER_NAME = "difftune_import"
# suffixes of the down factor of one LoRA module, in the layouts diffusers converts
_UP_OF_DOWN = {".lora_down.weight": ".lora_up.weight", ".lora_A.weight": ".lora_B.weight",
               ".lora.down.weight": ".lora.up.weight", "_lora.down.weight": "_lora.up.weight",
               ".lora_linear_layer.down.weight": ".lora_linear_layer.up.weight"}
_DOWN_SUFFIXES = tuple(_UP_OF_DOWN)
_UNSUPPORTED = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    ".diff": "full-weight diff",
    "lora_mid": "LoCon Tucker",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    ".oft_": "OFT",
}


def is_foreign_file(path: str | os.PathLike) -> bool:
    """Whether a safetensors file lacks difftune's header entry (so it came from another tool)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return METADATA_KEY not in (handle.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return False  # the difftune reader names the damage


def _check_lora_keys(tensors: dict[str, torch.Tensor], source: str) -> None:
    for key in sorted(tensors):
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise AdapterFileError(
                    f"{source}: tensor '{key}' is a {kind} weight; difftune imports plain "
                    "LoRA files only (nothing was loaded)"
                )
    if not any(key.endswith(_DOWN_SUFFIXES) for key in tensors):
        raise AdapterFileError(
            f"{source}: neither a difftune adapter (no '{METADATA_KEY}' metadata) nor a "
            "LoRA file (no lora_down / lora_A tensors)"
        )
    for key in sorted(tensors):
        suffix = next((d for d in _DOWN_SUFFIXES if key.endswith(d)), None)
        if suffix is not None and key[: -len(suffix)] + _UP_OF_DOWN[suffix] not in tensors:
            raise AdapterFileError(f"{source}: tensor '{key}' has no up factor "
                                   f"'{key[: -len(suffix)] + _UP_OF_DOWN[suffix]}' (nothing was loaded)")
    bad = first_non_finite(tensors)
    if bad is not None:
        raise AdapterFileError(f"{source}: tensor '{bad}' holds NaN or inf values")


def _models(pipeline: Any) -> dict[str, nn.Module]:
    from ..api import DENOISER_COMPONENTS, TEXT_ENCODER_COMPONENTS

    names = (*DENOISER_COMPONENTS, *TEXT_ENCODER_COMPONENTS)
    return {name: model for name in names if isinstance(model := getattr(pipeline, name, None), nn.Module)}


def _rename_kohya(
    tensors: dict[str, torch.Tensor], family: str, models: dict[str, nn.Module], source: str
) -> dict[str, torch.Tensor]:
    """kohya-form keys diffusers does not convert (SD3's) → peft keys, alpha/rank folded into up."""
    lookup = {}
    for component, model in models.items():
        if component not in KOHYA_PREFIXES[family]:
            continue
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                lookup[kohya_module_name(family, component, name, None)] = f"{component}.{name}"
    renamed = {}
    for key in sorted(tensors):
        stem, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        if stem not in lookup or suffix not in ("lora_down.weight", "lora_up.weight"):
            raise AdapterFileError(
                f"{source}: key '{key}' maps to no module of this {family} model (nothing was loaded)"
            )
        value = tensors[key]
        if suffix == "lora_up.weight":
            rank = tensors[f"{stem}.lora_down.weight"].shape[0]
            alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else float(rank)
            renamed[f"{lookup[stem]}.lora_B.weight"] = value.float() * (alpha / rank)
        else:
            renamed[f"{lookup[stem]}.lora_A.weight"] = value
    return renamed


def _one_alpha(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya-form file with one alpha for every module: each module's alpha/rank is folded into its
    up factor against the largest alpha. diffusers 0.42 drops per-module alphas it cannot name (its
    alpha_pattern keeps converted kohya names that match no module), so those modules would load at
    the wrong strength; with a single alpha there is no pattern to get wrong."""
    stems = [k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")]
    alphas = {
        s: float(tensors[f"{s}.alpha"])
        if f"{s}.alpha" in tensors
        else float(tensors[f"{s}.lora_down.weight"].shape[0])
        for s in stems
    }
    if len(set(alphas.values())) <= 1:
        return tensors
    common = max(alphas.values())
    state = dict(tensors)
    for stem, alpha in alphas.items():
        up = f"{stem}.lora_up.weight"
        if up in state:  # a missing up factor is named by diffusers' converter
            state[up] = state[up].float() * (alpha / common)
        state[f"{stem}.alpha"] = torch.tensor(common)
    return state


def _imported_layers(
    models: dict[str, nn.Module],
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """``{component: {module: (A, B, scaling)}}`` of the LoRA layers diffusers' loader made."""
    from peft.tuners.lora import LoraLayer

    found: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and IMPORT_ADAPTER_NAME in module.lora_A:
                found.setdefault(component, {})[name] = (
                    module.lora_A[IMPORT_ADAPTER_NAME].weight.detach().clone(),
                    module.lora_B[IMPORT_ADAPTER_NAME].weight.detach().clone(),
                    float(module.scaling[IMPORT_ADAPTER_NAME]),
                )
    return found


def _stem(key: str) -> str:
    for suffix in _DOWN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _first_unmapped(
    file_keys: list[str], found: dict[str, dict[str, Any]], family: str, unet_config: Any
) -> str:
    """The first down key of the file whose module is not among the loaded ones (by every name the
    module can have in a file); the first key when none can be told apart."""
    known = set()
    for component, layers in found.items():
        for module in layers:
            known.update(
                {f"{component}.{module}", module, f"{component}.{module.replace('.to_', '.processor.to_')}"}
            )
            if component in KOHYA_PREFIXES.get(family, {}):
                known.add(kohya_module_name(family, component, module, unet_config))
    for key in file_keys:
        stem = _stem(key).replace("_lora", "")
        if stem not in known and stem.removesuffix(".0") not in known:
            return key
    return file_keys[0]


def import_lora(pipeline: Any, path: str | os.PathLike, scale: float = 1.0):
    """Attach the LoRA file of another tool at ``path`` to ``pipeline`` as difftune LoRA adapters
    (denoiser and text encoders); returns the denoiser's adapter."""
    from ..api import add_adapter, find_denoiser, has_adapter, remove_adapter, set_adapter_scale
    from ..model_factory import pipeline_family

    source = str(path)
    if isinstance(pipeline, nn.Module):
        raise DifftuneError(
            f"{source}: a LoRA file of another tool loads into a pipeline "
            "(difftune.load_adapter(pipe, ...)), not into a bare model"
        )
    tensors, _ = read_safetensors(path)
    _check_lora_keys(tensors, source)
    family = pipeline_family(pipeline)
    models = _models(pipeline)
    denoiser, denoiser_name = find_denoiser(pipeline)
    unet_config = denoiser.config if denoiser_name == "unet" else None
    file_keys = sorted(k for k in tensors if k.endswith(_DOWN_SUFFIXES))
    state = dict(tensors)
    if family == "sd3" and any(k.startswith("lora_") for k in tensors):
        state = _rename_kohya(state, family, models, source)
    else:
        state = _one_alpha(state)
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # its partial-load warnings are replaced by the check below
    try:
        pipeline.load_lora_weights(state, adapter_name=IMPORT_ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError, IndexError) as err:
        _unload(pipeline)
        first = str(err).strip().splitlines()
        raise AdapterFileError(
            f"{source}: diffusers cannot map this LoRA file: {' '.join(first[:3])[:300]} (nothing was loaded)"
        ) from None
    finally:
        diffusers_logger.setLevel(level)
    found = _imported_layers(models)
    _unload(pipeline)
    mapped = sum(len(layers) for layers in found.values())
    if mapped != len(file_keys):
        key = _first_unmapped(file_keys, found, family, unet_config)
        raise AdapterFileError(
            f"{source}: key '{key}' maps to no module of this {family} model "
            f"({mapped} of the file's {len(file_keys)} LoRA modules map; nothing was loaded)"
        )
    if denoiser_name not in found:
        raise AdapterFileError(
            f"{source}: the file adapts only text encoders; difftune adapters start at the {denoiser_name}"
        )
    attached = []
    try:
        for component in [denoiser_name, *sorted(c for c in found if c != denoiser_name)]:
            attached.append(models[component])
            _attach(models[component], found[component], source, add_adapter)
    except BaseException:
        for model in attached:
            if has_adapter(model):
                remove_adapter(model)
        raise
    if scale != 1.0:
        set_adapter_scale(pipeline, scale)
    from ..api import get_adapter

    return get_adapter(denoiser)


def _unload(pipeline: Any) -> None:
    if hasattr(pipeline, "unload_lora_weights"):
        pipeline.unload_lora_weights()


def _attach(
    model: nn.Module,
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    source: str,
    add_adapter: Any,
) -> None:
    """One difftune LoRA over ``layers``. A common rank and scale are kept as rank and alpha; mixed
    ones become the largest rank at scale 1, each layer's scale folded into its up factor and its
    factors padded with zeros (zero rows and columns get zero gradients: they stay zero in training)."""
    kinds = {(a.shape[0], s) for a, _, s in layers.values()}
    if len(kinds) == 1:
        ((rank, scaling),) = kinds
        alpha, fold = scaling * rank, False
    else:
        rank = max(r for r, _ in kinds)
        alpha, fold = float(rank), True
    adapter = add_adapter(model, "lora", targets=sorted(layers), rank=rank, alpha=alpha)
    state = {}
    for name, (a, b, scaling) in layers.items():
        if fold:
            b = b * scaling
            pad = rank - a.shape[0]
            a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], 1)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    adapter.load_file_tensors(state, source)
