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

import re
from collections.abc import Mapping
from typing import Any

import torch

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


def _vae_tensors(vae: Any) -> dict[str, torch.Tensor]:
    num_blocks = len(vae.config.block_out_channels)
    tensors = {}
    for key, value in vae.state_dict().items():
        name = ldm_vae_name(key, num_blocks)
        if ".mid.attn_1." in name and value.dim() == 2:  # LDM keeps them as 1×1 convs
            value = value[:, :, None, None]
        tensors[VAE_PREFIX + name] = value
    return tensors


def _open_clip_tensors(encoder: Any) -> dict[str, torch.Tensor]:
    state = {text_encoder_path("text_encoder", k): v for k, v in encoder.state_dict().items()
             if not k.endswith("position_ids")}
    tensors = {
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    for layer in range(encoder.config.num_hidden_layers):
        source, target = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            tensors[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{source}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                tensors[f"{target}{theirs}.{kind}"] = state.pop(f"{source}{ours}.{kind}")
    if state:
        raise DifftuneError(f"text_encoder_2 tensor '{next(iter(state))}' has no OpenCLIP counterpart")
    return {OPEN_CLIP_PREFIX + k: v for k, v in tensors.items()}


def single_file_state_dict(pipeline: Any, clip_prefix: str,
                           open_clip: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of a (merged) SD 1.x or SDXL pipeline under its original checkpoint name: the UNet,
    the VAE, the CLIP-L text encoder under ``clip_prefix`` and, with ``open_clip``, SDXL's second
    encoder in the OpenCLIP layout."""
    unet = pipeline.unet
    prefixes = unet_block_prefixes(unet.config)
    tensors = {UNET_PREFIX + ldm_unet_name(k, unet.config, prefixes): v for k, v in unet.state_dict().items()}
    tensors.update(_vae_tensors(pipeline.vae))
    clip = {k: v for k, v in pipeline.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    tensors.update({clip_prefix + text_encoder_path("text_encoder", k): v for k, v in clip.items()})
    if open_clip:
        tensors.update(_open_clip_tensors(pipeline.text_encoder_2))
    return tensors
