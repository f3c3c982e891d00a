"""Which text-encoder tensors ComfyUI's LoRA loader has a key for, so an export says what it leaves out.

ComfyUI maps the LoRA and ``.diff`` keys of a CLIP text encoder (``model_lora_keys_clip`` in its
``comfy/lora.py``) for six modules of each of the first 32 encoder layers only, ``self_attn.q_proj``,
``k_proj``, ``v_proj``, ``out_proj``, ``mlp.fc1`` and ``mlp.fc2`` (their ``.diff_b`` biases ride on
the same keys), and for ``text_projection`` under ``lora_te1_``/``lora_te2_``. A key it has no entry
for is skipped with a warning: the layer norms a SaRA adapter with ``include_bias_norm`` changes,
the embeddings, the final layer norm. Every denoiser weight of SD 1.x and SDXL has its key there.
"""

from __future__ import annotations

import re

from ..families.base import LoraKeyLayout, text_encoder_path

COMFYUI_CLIP_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                        "mlp.fc1", "mlp.fc2")
COMFYUI_CLIP_LAYERS = 32
COMFYUI_PROJECTION_PREFIXES = ("lora_te1", "lora_te2")
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")


def comfyui_maps(layout: LoraKeyLayout, component: str, tensor_name: str) -> bool:
    """Whether ComfyUI's loader has a key for this changed tensor (``<module>.weight`` / ``.bias``) of a
    pipeline component written in ``layout``: the denoiser's always, a text encoder's as the module
    docstring says."""
    if not component.startswith("text_encoder"):
        return True
    path = text_encoder_path(component, tensor_name.rpartition(".")[0])
    if path == "text_projection":
        return layout.prefixes.get(component) in COMFYUI_PROJECTION_PREFIXES
    match = _LAYER.fullmatch(path)
    return bool(match) and int(match[1]) < COMFYUI_CLIP_LAYERS and match[2] in COMFYUI_CLIP_MODULES
