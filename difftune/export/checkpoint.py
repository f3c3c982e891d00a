"""A merged pipeline as one checkpoint in the original (LDM/SAI) key layout: what A1111, Forge and
ComfyUI's checkpoint loader open, and what diffusers' ``from_single_file`` converts back.

SD 1.x: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.*`` (CLIP-L). SDXL: the same UNet and VAE prefixes,
``conditioner.embedders.0.transformer.*`` (CLIP-L) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG layout: fused in_proj, transposed text_projection).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import DifftuneError
from .names import clip_text_path, ldm_unet_name, unet_block_prefixes

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {"sd": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


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
    state = {clip_text_path(k): v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
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


def single_file_state_dict(pipeline: Any, family: str) -> dict[str, torch.Tensor]:
    """Every weight of a (merged) SD 1.x or SDXL pipeline under its original checkpoint name."""
    if family not in CLIP_PREFIXES:
        raise DifftuneError(f"no single-file layout for a '{family}' pipeline (SD 1.x and SDXL only)")
    unet = pipeline.unet
    prefixes = unet_block_prefixes(unet.config)
    tensors = {UNET_PREFIX + ldm_unet_name(k, unet.config, prefixes): v for k, v in unet.state_dict().items()}
    tensors.update(_vae_tensors(pipeline.vae))
    clip = {k: v for k, v in pipeline.text_encoder.state_dict().items() if not k.endswith("position_ids")}
    tensors.update({CLIP_PREFIXES[family] + clip_text_path(k): v for k, v in clip.items()})
    if family == "sdxl":
        tensors.update(_open_clip_tensors(pipeline.text_encoder_2))
    return tensors
