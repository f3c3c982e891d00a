"""FLUX.1 (dev, schnell): an MMDiT transformer with single blocks, flow matching on 2x2-packed latent
tokens, CLIP pooled + T5 sequence prompts and, on dev, a guidance embedding instead of CFG."""

from __future__ import annotations

from typing import Any

import torch

from .base import FlowMatchingFamily, LoraKeyLayout
from .mmdit import CONTEXT_FEED_FORWARD, JOINT_ATTENTION
from .tiny import (
    clip_text_config,
    offline_clip_tokenizer,
    offline_t5_tokenizer,
    tiny_t5_encoder,
    tiny_vae,
)

# The public FLUX.1-dev transformer config (schnell: the same without the guidance embedding).
FLUX_DEV_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

# The single blocks' parallel MLP: proj_mlp in, proj_out out (its input also carries the attention output).
SINGLE_BLOCK_MLP = (r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)",
                    "proj_mlp, proj_out of the single blocks")

# The diffusers module path under ``transformer.``, with peft's lora_A / lora_B: what ai-toolkit and
# diffusers' Flux scripts write and ComfyUI maps onto its own (fused q/k/v) Flux weights.
DIFFUSERS_NAMES = LoraKeyLayout({"transformer": "transformer"}, separator=".", down="lora_A.weight",
                                up="lora_B.weight")


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    title = "Flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_class = "FluxTransformer2DModel"
    text_encoder_components = ("text_encoder", "text_encoder_2")
    default_sample_size = 128  # FluxPipeline.default_sample_size: 1024 px
    latent_packing = 2
    family_flags = ("guidance_scale", "max_sequence_length")
    # diffusers' train_dreambooth_lora_flux.py: uniform timesteps and loss, FLUX.1-dev's distilled
    # guidance, T5 prompts of 512 tokens
    option_defaults = {**FlowMatchingFamily.option_defaults, "weighting_scheme": "none",
                       "guidance_scale": 3.5, "max_sequence_length": 512}
    prompt_outputs = ("prompt_embeds", "pooled_prompt_embeds", None)  # (the text ids are all zero)
    conditioning_arguments = {"encoder_hidden_states": "prompt_embeds",
                              "pooled_projections": "pooled_prompt_embeds"}
    embedded_guidance = True
    target_terms = {"attn": (JOINT_ATTENTION,), "attn-ff": (CONTEXT_FEED_FORWARD, SINGLE_BLOCK_MLP)}
    reference_configs = {"flux-dev-config": FLUX_DEV_TRANSFORMER_CONFIG}
    lora_layouts = {"comfyui": DIFFUSERS_NAMES}
    export_refusals = {"kohya": "kohya sd-scripts' FLUX.1 names fuse q/k/v and the single blocks' "
                                "projections; use --format comfyui (the layout ComfyUI and ai-toolkit use "
                                "for FLUX.1, which diffusers loads too)"}
    base_version = "flux1"
    # FLUX.1-dev's layout (joint and single blocks, guidance embedding); the pipeline packs 2x2
    # patches of the 4-channel latent, hence 16 input channels.
    tiny_denoiser_config = {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 4, 8),
    }

    @classmethod
    def tiny_components(cls):
        """CLIP + T5 encoders, FLUX.1-dev's scheduler (resolution-dependent shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import CLIPTextModel

        vae = tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                       use_post_quant_conv=False)
        tokenizer, tokenizer_2 = offline_clip_tokenizer(), offline_t5_tokenizer()
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        return {"vae": vae, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
                "text_encoder": CLIPTextModel(clip_text_config(tokenizer)),
                "text_encoder_2": tiny_t5_encoder(tokenizer_2), "scheduler": scheduler}

    @classmethod
    def pack_latents(cls, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents as FluxPipeline's tokens of 2x2 patches (B, h/2·w/2, 4C)."""
        from diffusers import FluxPipeline

        if latents.dim() != 4:
            return latents
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    @classmethod
    def unpack_latents(cls, latents, height, width, vae_scale_factor, vae=None):
        from diffusers import FluxPipeline

        if latents.dim() != 3:
            return latents
        return FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor)

    # --- training ---------------------------------------------------------------------------

    def encode_prompt_kwargs(self, prompts, with_negative):
        # FLUX.1 is sampled without classifier-free guidance (dev distils it into the guidance
        # embedding), so there is no negative prompt to encode.
        return {"prompt": prompts, "prompt_2": None, "device": self.device, "num_images_per_prompt": 1,
                "max_sequence_length": self.options.max_sequence_length}

    def denoiser_timestep(self, noisy):
        return noisy.timesteps.to(noisy.model_input.dtype) / 1000  # in [0, 1]

    def extra_model_kwargs(self, noisy, batch):
        """Position ids of the latent tokens (row, column) and of the prompt tokens (zeros), and the
        guidance embedding's value on guidance-distilled models."""
        from diffusers import FluxPipeline

        latents = noisy.model_input
        b, _, h, w = latents.shape
        embeds = batch.conditioning["prompt_embeds"]
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        kwargs = {
            "img_ids": image_ids,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            "guidance": None,
        }
        if self.denoiser.config.guidance_embeds:
            kwargs["guidance"] = torch.full((b,), self.options.guidance_scale, device=latents.device,
                                            dtype=latents.dtype)
        return kwargs

    def output_to_latent(self, output, noisy):
        _, _, h, w = noisy.model_input.shape
        scale = self.pipeline.vae_scale_factor  # unpacking works in pixels
        return self.unpack_latents(output, h * scale, w * scale, scale)
