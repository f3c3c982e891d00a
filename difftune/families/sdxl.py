"""SDXL: a UNet with added (pooled text, size) conditioning and two CLIP text encoders."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .base import LoraKeyLayout, TrainingBatch
from .ldm import SDXL_CLIP_PREFIX, ldm_module_path
from .tiny import clip_text_config, offline_clip_tokenizer, tiny_vae
from .unet import TINY_UNET_CONFIG, UNetFamily

# The public SDXL base UNet config.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

# kohya sd-scripts trains SDXL on Stability's own UNet: its LoRA names (what A1111 and ComfyUI read)
# follow the original (LDM) module paths.
KOHYA_NAMES = LoraKeyLayout({"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
                            module_path=ldm_module_path)


class SDXLFamily(UNetFamily):
    name = "sdxl"
    title = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_encoder_components = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    prompt_outputs = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                      "negative_pooled_prompt_embeds")
    reference_configs = {"sdxl-config": SDXL_UNET_CONFIG}
    lora_layouts = {"kohya": KOHYA_NAMES, "comfyui": KOHYA_NAMES}
    base_version = "sdxl_base_v1-0"
    single_file_layout = "SDXL"
    clip_checkpoint_prefix = SDXL_CLIP_PREFIX
    # SDXL layout: two text encoders, added time ids, linear proj_in
    tiny_denoiser_config = {
        **TINY_UNET_CONFIG,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 80,  # 6 time ids * 8 + pooled 32
        "cross_attention_dim": 64,
    }

    @classmethod
    def tiny_components(cls):
        from diffusers import EulerDiscreteScheduler
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        vae, tokenizer = tiny_vae(), offline_clip_tokenizer()
        return {"vae": vae, "tokenizer": tokenizer, "tokenizer_2": copy.deepcopy(tokenizer),
                "text_encoder": CLIPTextModel(clip_text_config(tokenizer)),
                "text_encoder_2": CLIPTextModelWithProjection(clip_text_config(tokenizer)),
                "scheduler": EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                    beta_schedule="scaled_linear", steps_offset=1,
                                                    timestep_spacing="leading")}

    def time_ids(self, batch: TrainingBatch, latents: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop corner and target size per example."""
        target = torch.tensor(latents.shape[-2:], device=latents.device) * self.pipeline.vae_scale_factor
        target = target.expand(latents.shape[0], 2)
        return torch.cat([batch.original_sizes, batch.crops_top_left, target], dim=1).float()

    def extra_model_kwargs(self, noisy, batch):
        return {"added_cond_kwargs": {"text_embeds": batch.conditioning["pooled_prompt_embeds"],
                                      "time_ids": self.time_ids(batch, noisy.model_input)}}
