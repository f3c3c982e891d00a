"""SD3 / SD3.5: an MMDiT transformer trained by flow matching, two CLIP encoders and T5."""

from __future__ import annotations

import copy

from torch import nn

from .base import FlowMatchingFamily, LoraKeyLayout
from .mmdit import CONTEXT_FEED_FORWARD, JOINT_ATTENTION
from .tiny import TINY_SAMPLE_SIZE, clip_text_config, offline_clip_tokenizer, tiny_vae

# OneTrainer's names (``lora_transformer_<diffusers path>``), which ComfyUI maps for SD3 and which
# diffusers does not read: difftune renames them itself when it imports such a file.
ONETRAINER_NAMES = LoraKeyLayout({"transformer": "lora_transformer", "text_encoder": "lora_te1",
                                  "text_encoder_2": "lora_te2"}, diffusers_reads=False)


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    title = "SD3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_class = "SD3Transformer2DModel"
    text_encoder_components = ("text_encoder", "text_encoder_2", "text_encoder_3")
    prompt_outputs = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                      "negative_pooled_prompt_embeds")
    conditioning_arguments = {"encoder_hidden_states": "prompt_embeds",
                              "pooled_projections": "pooled_prompt_embeds"}
    target_terms = {"attn": (JOINT_ATTENTION,), "attn-ff": (CONTEXT_FEED_FORWARD,)}
    lora_layouts = {"comfyui": ONETRAINER_NAMES}
    export_refusals = {"kohya": "SD3 has no kohya LoRA naming that A1111 reads; use --format comfyui "
                                "(the names ComfyUI maps for SD3)"}
    base_version = "sd3"
    tiny_denoiser_config = {
        "sample_size": TINY_SAMPLE_SIZE,
        "patch_size": 1,
        "in_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "caption_projection_dim": 32,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "out_channels": 4,
    }

    @classmethod
    def tiny_components(cls):
        """Two CLIP encoders, no T5."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModelWithProjection

        vae, tokenizer = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035), offline_clip_tokenizer()
        return {"vae": vae, "tokenizer": tokenizer, "tokenizer_2": copy.deepcopy(tokenizer),
                "tokenizer_3": None, "text_encoder": CLIPTextModelWithProjection(clip_text_config(tokenizer)),
                "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(tokenizer)),
                "text_encoder_3": None, "scheduler": FlowMatchEulerDiscreteScheduler()}

    @classmethod
    def modules_without_gradient(cls, denoiser: nn.Module) -> set[str]:
        """The last joint block is context-pre-only: its text stream's attention query feeds nothing."""
        last = len(denoiser.transformer_blocks) - 1
        return {f"transformer_blocks.{last}.attn.add_q_proj"}

    def encode_prompt_kwargs(self, prompts, with_negative):
        return {**super().encode_prompt_kwargs(prompts, with_negative), "prompt_2": None, "prompt_3": None}
