"""Read LoRA files made by other tools (kohya sd-scripts, A1111/ComfyUI exports, diffusers, peft) as a
difftune LoRA file, so `difftune.load_adapter` attaches them like its own: to evaluate, scale, merge
or train further.

diffusers' own loader does the key conversion (kohya and SGM/LDM names, alphas, conv LoRAs):
the file is loaded with ``pipe.load_lora_weights``, the LoRA factors and scales are read back
from the layers it made, and they become the sections of an `AdapterFile` of method ``lora``
on the same modules. Files in a layout diffusers does not read (SD3's ``lora_transformer_*``,
which ComfyUI reads) are renamed by the family's module-name rule first. A file is refused,
naming its first unmapped key, unless every LoRA module in it lands on a module of the model:
never a partial load.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from .adapter_file import (
    METADATA_KEY,
    AdapterFile,
    AdapterSection,
    difftune_traces,
    fingerprint,
    first_non_finite,
    read_safetensors,
)
from .errors import AdapterFileError, DifftuneError
from .families import denoiser_components, family_of, text_encoder_components
from .families.base import LoraKeyLayout, ModelFamily
from .tuners.lora import LoraAdapter

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
    """Whether a safetensors file came from another tool: no difftune header entry and no trace of one
    (`difftune_traces`: a damaged difftune file is read, and refused, as a difftune file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return False  # the difftune reader names the damage
    return METADATA_KEY not in metadata and difftune_traces(metadata) is None


def check_foreign_file(path: str | os.PathLike) -> None:
    """Another tool's file read and its keys checked as `import_lora` does first (no model needed)."""
    tensors, _ = read_safetensors(path)
    _check_lora_keys(tensors, str(path))


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
    names = (*denoiser_components(), *text_encoder_components())
    return {name: model for name in names if isinstance(model := getattr(pipeline, name, None), nn.Module)}


def _unread_layout(family: type[ModelFamily], tensors: dict[str, torch.Tensor]) -> LoraKeyLayout | None:
    """The family's LoRA layout that diffusers does not read and the file's keys are in, if any."""
    for layout in family.lora_layouts.values():
        prefixes = tuple(prefix + layout.separator for prefix in layout.prefixes.values())
        if not layout.diffusers_reads and any(key.startswith(prefixes) for key in tensors):
            return layout
    return None


def _rename_layout(
    tensors: dict[str, torch.Tensor], layout: LoraKeyLayout, family: type[ModelFamily],
    models: dict[str, nn.Module], source: str
) -> dict[str, torch.Tensor]:
    """Keys of a layout diffusers does not convert (SD3's) → peft keys, alpha/rank folded into up."""
    lookup = {}
    for component, model in models.items():
        if component not in layout.prefixes:
            continue
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                lookup[layout.key(component, name)] = f"{component}.{name}"
    renamed = {}
    for key in sorted(tensors):
        stem, _, suffix = key.partition(".")
        if suffix == "alpha":
            continue
        if stem not in lookup or suffix not in (layout.down, layout.up):
            raise AdapterFileError(
                f"{source}: key '{key}' maps to no module of this {family.name} model (nothing was loaded)"
            )
        value = tensors[key]
        if suffix == layout.up:
            rank = tensors[f"{stem}.{layout.down}"].shape[0]
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
    file_keys: list[str], found: dict[str, dict[str, Any]], family: type[ModelFamily], denoiser_config: Any
) -> str:
    """The first down key of the file whose module is not among the loaded ones (by every name the
    module can have in a file); the first key when none can be told apart."""
    known = set()
    for component, layers in found.items():
        for module in layers:
            known.update(
                {f"{component}.{module}", module, f"{component}.{module.replace('.to_', '.processor.to_')}"}
            )
            for layout in family.lora_layouts.values():
                if component in layout.prefixes:
                    known.add(layout.key(component, module, denoiser_config))
    for key in file_keys:
        stem = _stem(key).replace("_lora", "")
        if stem not in known and stem.removesuffix(".0") not in known:
            return key
    return file_keys[0]


def read_foreign_lora(pipeline: Any, path: str | os.PathLike) -> AdapterFile:
    """The LoRA file of another tool at ``path``, read through ``pipeline`` (whose modules it must
    fit), as a difftune file of LoRA sections (denoiser and text encoders) that
    `difftune.load_adapter` attaches; the pipeline is left as it was."""
    source = str(path)
    if isinstance(pipeline, nn.Module):
        raise DifftuneError(
            f"{source}: a LoRA file of another tool loads into a pipeline "
            "(difftune.load_adapter(pipe, ...)), not into a bare model"
        )
    tensors, _ = read_safetensors(path)
    _check_lora_keys(tensors, source)
    family = family_of(pipeline)
    if not family.diffusers_loads_lora:
        raise DifftuneError(f"{source}: diffusers has no LoRA loader for {family.title} pipelines, which "
                            "difftune reads other tools' LoRA files with")
    models = _models(pipeline)
    denoiser_name = family.denoiser_component
    denoiser_config = models[denoiser_name].config
    file_keys = sorted(k for k in tensors if k.endswith(_DOWN_SUFFIXES))
    layout = _unread_layout(family, tensors)  # one diffusers cannot convert: renamed here
    state = dict(tensors)  # diffusers' converters pop from the dict they get
    state = _one_alpha(state) if layout is None else _rename_layout(state, layout, family, models, source)
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.ERROR)  # its partial-load warnings are replaced by the check below
    # the file itself when nothing was renamed, so diffusers also reads its header (the
    # lora_adapter_metadata of peft/diffusers files: alpha, rank and alpha patterns)
    source_or_state = str(path) if _unchanged(state, tensors) else state
    try:
        pipeline.load_lora_weights(source_or_state, adapter_name=IMPORT_ADAPTER_NAME)
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
        key = _first_unmapped(file_keys, found, family, denoiser_config)
        raise AdapterFileError(
            f"{source}: key '{key}' maps to no module of this {family.name} model "
            f"({mapped} of the file's {len(file_keys)} LoRA modules map; nothing was loaded)"
        )
    if denoiser_name not in found:
        raise AdapterFileError(
            f"{source}: the file adapts only text encoders; difftune adapters start at the {denoiser_name}"
        )
    sections = {component: _section(models[component], found[component])
                for component in [denoiser_name, *sorted(c for c in found if c != denoiser_name)]}
    return AdapterFile(component=denoiser_name, sections=sections, source=source)


def _unchanged(state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> bool:
    return state.keys() == tensors.keys() and all(state[k] is tensors[k] for k in tensors)


def _unload(pipeline: Any) -> None:
    if hasattr(pipeline, "unload_lora_weights"):
        pipeline.unload_lora_weights()


def _section(model: nn.Module, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> AdapterSection:
    """One difftune LoRA section over ``layers``. A common rank and scale are kept as rank and alpha; mixed
    ones become the largest rank at scale 1, each layer's scale folded into its up factor and its
    factors padded with zeros (zero rows and columns get zero gradients: they stay zero in training)."""
    kinds = {(a.shape[0], s) for a, _, s in layers.values()}
    if len(kinds) == 1:
        ((rank, scaling),) = kinds
        alpha, fold = scaling * rank, False
    else:
        rank = max(r for r, _ in kinds)
        alpha, fold = float(rank), True
    state = {}
    for name, (a, b, scaling) in layers.items():
        if fold:
            b = b * scaling
            pad = rank - a.shape[0]
            a = torch.cat([a, a.new_zeros(pad, *a.shape[1:])], 0)
            b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], 1)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    targets = sorted(layers)
    config = {"targets": targets, "rank": rank, "alpha": alpha}
    return AdapterSection(method=LoraAdapter.method, config=config, targets=targets,
                          fingerprint=fingerprint(model, targets), extra={}, tensors=state)
