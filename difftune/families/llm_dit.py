"""What the DiT families prompted by a language model share (FLUX.2, Qwen-Image, Z-Image): one text
encoder (a decoder-only LLM whose hidden states are the prompt), 1024-px native resolution, and the
training defaults of their diffusers DreamBooth scripts: uniform timesteps with unit loss weights and
512 prompt tokens (``--max_sequence_length``)."""

from __future__ import annotations

import dataclasses

from .base import FlowMatchingFamily, LoraKeyLayout
from .flux import DIFFUSERS_NAMES


def comfyui_names(known_modules: str | None = None) -> LoraKeyLayout:
    """diffusers' module names under ``transformer.`` with peft's lora_A / lora_B, which ComfyUI maps for
    these families (``known_modules``: the ones its table names) and diffusers' loaders read. No alpha
    tensors: diffusers refuses them in this layout (FLUX.2) or takes them for kohya's (Qwen-Image)."""
    return dataclasses.replace(DIFFUSERS_NAMES, tool="ComfyUI", writes_alpha=False,
                               known_modules=known_modules)


def kohya_refusal(title: str) -> dict[str, str]:
    return {"kohya": f"kohya sd-scripts has no {title} LoRA names that A1111 reads; use --format comfyui "
                     f"(diffusers' module names, which ComfyUI maps for {title} and diffusers loads)"}


class LanguageModelDiTFamily(FlowMatchingFamily):
    """Its subclasses name the modules ComfyUI maps (``comfyui_modules``, a regex; None: all) and get
    the ``comfyui`` LoRA layout and the kohya refusal from it."""

    comfyui_modules: str | None = None
    text_encoder_components = ("text_encoder",)
    default_sample_size = 128  # the pipelines' default: 1024 px with an 8x VAE
    family_flags = ("max_sequence_length",)
    option_defaults = {**FlowMatchingFamily.option_defaults, "weighting_scheme": "none",
                       "max_sequence_length": 512}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.lora_layouts = {"comfyui": comfyui_names(cls.comfyui_modules)}
        cls.export_refusals = kohya_refusal(cls.title)

    def encode_prompt_kwargs(self, prompts, with_negative):
        # their encode_prompt has no negative prompt: the pipelines encode one themselves when they guide
        return {"prompt": prompts, "device": self.device, "num_images_per_prompt": 1,
                "max_sequence_length": self.options.max_sequence_length}

    def denoiser_timestep(self, noisy):
        return noisy.timesteps.to(noisy.model_input.dtype) / 1000  # in [0, 1]
