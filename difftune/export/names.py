"""Module names the other tools use: kohya/A1111/ComfyUI LoRA names and the original (LDM/SAI) layout.

kohya sd-scripts names a LoRA module ``<prefix>_<module path with "." → "_">``. The module path is
the diffusers one for SD 1.x/2.x (sd-scripts trains those on a diffusers-layout UNet) and the
original SGM/LDM one for SDXL (``input_blocks.4.1...``: sd-scripts trains SDXL on its own copy of
Stability's UNet), which is also what A1111 and ComfyUI read for SDXL. SD3 LoRAs use the diffusers
path under ``lora_transformer`` (the OneTrainer form ComfyUI maps). The same diffusers → LDM map
writes single-file checkpoints, whose keys diffusers' ``from_single_file`` converts back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import DifftuneError

# kohya prefixes by (family, component)
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    "sd3": {"transformer": "lora_transformer", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
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


def kohya_module_name(family: str, component: str, module: str, unet_config: Mapping[str, Any] | None) -> str:
    """The kohya/A1111/ComfyUI LoRA name of one module of a pipeline component."""
    prefixes = KOHYA_PREFIXES.get(family)
    if prefixes is None or component not in prefixes:
        raise DifftuneError(f"no kohya LoRA names for the {component} of a '{family}' model")
    if family == "sdxl" and component == "unet":
        path = ldm_unet_name(module, unet_config)
    else:
        path = clip_text_path(module) if component.startswith("text_encoder") else module
    return f"{prefixes[component]}_{path.replace('.', '_')}"


def clip_text_path(name: str) -> str:
    """A CLIP text-encoder module or tensor name as the original checkpoints spell it (under
    ``text_model.``): transformers 5.6 dropped that level from CLIPTextModel (not from
    CLIPTextModelWithProjection), the tools and files kept it."""
    if name.startswith(("text_model.", "text_projection")):
        return name
    return f"text_model.{name}"
