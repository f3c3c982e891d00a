"""SD 1.x/2.x: a UNet2DConditionModel, one CLIP text encoder, ε or v prediction."""

from __future__ import annotations

from typing import Any

from .base import LoraKeyLayout
from .ldm import SD1_CLIP_PREFIX
from .tiny import clip_text_config, offline_clip_tokenizer, tiny_vae
from .unet import TINY_UNET_CONFIG, UNetFamily

# The public SD 1.5 UNet config: parameter counts and benchmarks of the real architecture.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

# kohya sd-scripts' names: the diffusers module path (it trains SD 1.x on a diffusers-layout UNet)
KOHYA_NAMES = LoraKeyLayout({"unet": "lora_unet", "text_encoder": "lora_te"})


class SDFamily(UNetFamily):
    name = "sd"
    title = "SD 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    text_encoder_components = ("text_encoder",)
    trainable_text_encoders = ("text_encoder",)
    prompt_outputs = ("prompt_embeds", "negative_prompt_embeds")
    reference_configs = {"sd15-config": SD15_UNET_CONFIG}
    lora_layouts = {"kohya": KOHYA_NAMES, "comfyui": KOHYA_NAMES}
    base_version = "sd_v1"
    single_file_layout = "SD 1.x"
    clip_checkpoint_prefix = SD1_CLIP_PREFIX
    # SD 1.x layout: 1x1-conv proj_in/proj_out
    tiny_denoiser_config = {**TINY_UNET_CONFIG, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32}

    @classmethod
    def tiny_components(cls, prediction_type: str = "epsilon"):
        from diffusers import DDIMScheduler
        from transformers import CLIPTextModel

        vae, tokenizer = tiny_vae(), offline_clip_tokenizer()
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type=prediction_type)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer))
        return {"vae": vae, "tokenizer": tokenizer, "text_encoder": text_encoder,
                "scheduler": scheduler, "safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}
