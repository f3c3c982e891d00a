"""The original (LDM/SGM) layout of Stable Diffusion's UNet, VAE and text encoders, which the SD 1.x
and SDXL families use for kohya LoRA names and single-file checkpoints.

kohya sd-scripts trains SDXL on its own copy of Stability's UNet, so SDXL LoRA names (what A1111 and
ComfyUI read) follow the LDM module paths (``input_blocks.4.1...``), not diffusers'. A merged pipeline
written as one checkpoint in this layout is what A1111, Forge and ComfyUI's checkpoint loader open,
and what diffusers' ``from_single_file`` converts back.

SD 1.x: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.*`` (CLIP-L). SDXL: the same UNet and VAE prefixes,
``conditioner.embedders.0.transformer.*`` (CLIP-L) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG layout: fused in_proj, transposed text_projection).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..adapter_file import LazyTensor
from ..errors import DifftuneError
from .base import text_encoder_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# diffusers → LDM names inside a UNet resnet block (the inverse of diffusers' own single-file map)
_RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _module_table(table: Mapping[str, str]) -> dict[str, str]:
    return {
        k.removesuffix(".weight"): v.removesuffix(".weight")
        for k, v in table.items()
        if k.endswith(".weight")
    }


def _unet_top_ldm() -> dict[str, str]:
    """Modules outside the blocks (time/label embeddings, conv_in, conv_out), from diffusers' own
    single-file table."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    return {
        name: ldm
        for part in ("layers", "class_embed_type", "addition_embed_type")
        for name, ldm in _module_table(tables[part]).items()
    }


def _config_value(config: Mapping[str, Any], key: str) -> Any:
    return config[key] if key in config else getattr(config, key)


def unet_block_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """``(diffusers prefix, LDM prefix, is_resnet)`` for every block of a UNet2DConditionModel config.

    LDM numbers the down path as ``input_blocks`` (conv_in at 0, then layers_per_block entries and
    one downsampler per level), the mid block as ``middle_block.0/1/2`` and the up path as
    ``output_blocks`` (layers_per_block + 1 entries per level, the upsampler inside the last).
    """
    per_level = _config_value(config, "layers_per_block")
    if not isinstance(per_level, int):
        raise DifftuneError(f"the original (LDM) layout needs one layers_per_block, got {per_level!r}")
    down_types = list(_config_value(config, "down_block_types"))
    up_types = list(_config_value(config, "up_block_types"))
    prefixes: list[tuple[str, str, bool]] = []
    for level, kind in enumerate(down_types):
        for j in range(per_level):
            index = 1 + level * (per_level + 1) + j
            prefixes.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{index}.0.", True))
            if "CrossAttn" in kind:
                prefixes.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{index}.1.", False))
        if level < len(down_types) - 1:
            prefixes.append(
                (
                    f"down_blocks.{level}.downsamplers.0.conv.",
                    f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.",
                    False,
                )
            )
    prefixes += [
        ("mid_block.resnets.0.", "middle_block.0.", True),
        ("mid_block.attentions.0.", "middle_block.1.", False),
        ("mid_block.resnets.1.", "middle_block.2.", True),
    ]
    for level, kind in enumerate(up_types):
        attention = "CrossAttn" in kind
        for j in range(per_level + 1):
            index = level * (per_level + 1) + j
            prefixes.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{index}.0.", True))
            if attention:
                prefixes.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{index}.1.", False))
        if level < len(up_types) - 1:
            last = level * (per_level + 1) + per_level
            prefixes.append(
                (f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{last}.{2 if attention else 1}.", False)
            )
    return prefixes


def ldm_unet_name(
    name: str, config: Mapping[str, Any], prefixes: list[tuple[str, str, bool]] | None = None
) -> str:
    """The LDM name of a diffusers UNet module or tensor name (``down_blocks.1.attentions.0.proj_in`` →
    ``input_blocks.4.1.proj_in``); a DifftuneError for a name with no LDM counterpart."""
    for diffusers_name, ldm_name in _unet_top_ldm().items():
        if name == diffusers_name or name.startswith(diffusers_name + "."):
            return ldm_name + name[len(diffusers_name) :]
    for diffusers_prefix, ldm_prefix, is_resnet in prefixes or unet_block_prefixes(config):
        if f"{name}.".startswith(diffusers_prefix):  # a module name lacks the prefix's last dot
            rest = name[len(diffusers_prefix) :]
            if is_resnet:
                head, _, tail = rest.partition(".")
                rest = ".".join(filter(None, [_RESNET_LDM.get(head, head), tail]))
            return (ldm_prefix + rest).rstrip(".")
    raise DifftuneError(f"UNet module '{name}' has no name in the original (LDM) layout")


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def ldm_module_path(component: str, module: str, unet_config: Mapping[str, Any]) -> str:
    """A module's path in the original layout: LDM names in the UNet, ``text_model.`` paths in CLIP."""
    if component == "unet":
        return ldm_unet_name(module, unet_config)
    return text_encoder_path(component, module)


def ldm_vae_name(key: str, num_blocks: int) -> str:
    """The LDM name of a diffusers AutoencoderKL tensor (the mid attention keeps its 1×1-conv names)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key]
    rules = [
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)",
            lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
            lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)",
            lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}",
        ),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match).replace("conv_shortcut", "nin_shortcut")
    raise DifftuneError(f"VAE tensor '{key}' has no name in the original (LDM) layout")


Replace = Callable[[str, str], torch.Tensor | None]  # (component, key) → a tensor to write instead, or None
States = dict[str, dict[str, torch.Tensor]]  # component → its state dict


def _lazy(component: str, key: str, value: torch.Tensor, replace: Replace | None,
          change: Callable[[torch.Tensor], torch.Tensor] | None = None,
          shape: tuple[int, ...] | None = None) -> LazyTensor:
    """One weight made when written: ``replace``'s tensor for it if any (a merged weight), else the
    state's, then ``change`` (a reshape or transpose) giving ``shape``."""
    def make() -> torch.Tensor:
        tensor = replace(component, key) if replace is not None else None
        tensor = value if tensor is None else tensor
        return change(tensor) if change is not None else tensor

    return LazyTensor(tuple(value.shape) if shape is None else shape, value.dtype, make)


def _vae_entries(vae_state: dict[str, torch.Tensor], num_blocks: int, replace: Replace | None
                 ) -> dict[str, LazyTensor]:
    entries = {}
    for key, value in vae_state.items():
        name = ldm_vae_name(key, num_blocks)
        if ".mid.attn_1." in name and value.dim() == 2:  # LDM keeps them as 1×1 convs
            entries[VAE_PREFIX + name] = _lazy("vae", key, value, replace, lambda t: t[:, :, None, None],
                                               (*value.shape, 1, 1))
        else:
            entries[VAE_PREFIX + name] = _lazy("vae", key, value, replace)
    return entries


def _open_clip_entries(state: dict[str, torch.Tensor], num_layers: int, replace: Replace | None
                       ) -> dict[str, LazyTensor]:
    """text_encoder_2 in the OpenCLIP layout: q, k, v fused into in_proj, text_projection transposed."""
    component = "text_encoder_2"
    state = {text_encoder_path("text_encoder", k): (k, v) for k, v in state.items()
             if not k.endswith("position_ids")}

    def take(path: str, change=None, shape=None) -> LazyTensor:
        key, value = state.pop(path)
        return _lazy(component, key, value, replace, change, shape)

    projection = state["text_projection.weight"][1]
    entries = {
        "token_embedding.weight": take("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": take("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": take("text_model.final_layer_norm.weight"),
        "ln_final.bias": take("text_model.final_layer_norm.bias"),
        "text_projection": take("text_projection.weight", lambda t: t.T.contiguous(),
                                tuple(reversed(projection.shape))),
    }
    for layer in range(num_layers):
        source, target = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            parts = [take(f"{source}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            entries[f"{target}attn.in_proj_{kind}"] = LazyTensor(
                shape, parts[0].dtype, functools.partial(lambda ps: torch.cat([p.make() for p in ps]), parts))
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                entries[f"{target}{theirs}.{kind}"] = take(f"{source}{ours}.{kind}")
    if state:
        raise DifftuneError(f"text_encoder_2 tensor '{next(iter(state))}' has no OpenCLIP counterpart")
    return {OPEN_CLIP_PREFIX + k: v for k, v in entries.items()}


def component_states(pipeline: Any, open_clip: bool = False) -> States:
    """The state dicts a single file is made of (views of the weights, no copies): take them before an
    adapter wraps the modules, so the names are the bare model's."""
    parts = ["unet", "vae", "text_encoder", *(["text_encoder_2"] if open_clip else [])]
    return {part: getattr(pipeline, part).state_dict() for part in parts}


def single_file_entries(pipeline: Any, clip_prefix: str, open_clip: bool = False,
                        states: States | None = None, replace: Replace | None = None
                        ) -> dict[str, LazyTensor]:
    """Every weight of an SD 1.x or SDXL pipeline under its original checkpoint name (the UNet, the VAE,
    the CLIP-L text encoder under ``clip_prefix`` and, with ``open_clip``, SDXL's second encoder in the
    OpenCLIP layout), each made only when a writer asks for it (`write_safetensors` streams them).
    ``states``: the components' state dicts (default: taken now, `component_states`);
    ``replace(component, key)``: a weight to write instead of the state's (an export's merged weights,
    computed one at a time), or None."""
    states = states or component_states(pipeline, open_clip)
    unet = pipeline.unet
    prefixes = unet_block_prefixes(unet.config)
    entries = {UNET_PREFIX + ldm_unet_name(k, unet.config, prefixes): _lazy("unet", k, v, replace)
               for k, v in states["unet"].items()}
    entries.update(_vae_entries(states["vae"], len(pipeline.vae.config.block_out_channels), replace))
    entries.update({clip_prefix + text_encoder_path("text_encoder", k): _lazy("text_encoder", k, v, replace)
                    for k, v in states["text_encoder"].items() if not k.endswith("position_ids")})
    if open_clip:
        entries.update(_open_clip_entries(states["text_encoder_2"],
                                          pipeline.text_encoder_2.config.num_hidden_layers, replace))
    return entries


def single_file_state_dict(pipeline: Any, clip_prefix: str,
                           open_clip: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of a (merged) SD 1.x or SDXL pipeline under its original checkpoint name, made now
    (`single_file_entries`)."""
    entries = single_file_entries(pipeline, clip_prefix, open_clip)
    return {name: entry.make() for name, entry in entries.items()}
