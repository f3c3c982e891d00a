"""Qwen-Image: a 20B MMDiT (60 joint blocks) over 2x2-packed latents of its own video-style VAE (one
frame), prompted by the last hidden state of Qwen2.5-VL, sampled with "true" classifier-free guidance
(a negative prompt and ``true_cfg_scale``).

As diffusers' ``train_dreambooth_lora_qwen_image.py`` does: a posterior sample normalised per channel
by the VAE's ``latents_mean`` / ``latents_std``; uniform timesteps with unit weights and unshifted
sigmas (the scheduler's dynamic, exponential shift is for sampling); the transformer takes the packed
tokens, the prompt with its padding mask, the timestep in [0, 1] and the image's token grid. difftune
keeps the latent as (B, 16, H, W): the VAE's frame axis (one frame) goes in and out with encoding,
packing and decoding.
"""

from __future__ import annotations

from typing import Any

import torch

from .flux import FluxFamily
from .llm_dit import LanguageModelDiTFamily
from .mmdit import JOINT_ATTENTION
from .tiny import offline_qwen_tokenizer, qwen_text_config

# The public Qwen-Image transformer config (Qwen/Qwen-Image; the 2512 and edit releases share it).
QWEN_IMAGE_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}

FEED_FORWARD = (r"(img|txt)_mlp\.net\.(0\.proj|2)", "img_mlp, txt_mlp of the joint blocks")

# (ComfyUI's Qwen-Image model keeps diffusers' module names: comfy/lora.py maps ``transformer.<name>`` of
# every weight, so every module has a name.)

TINY_TEXT_WIDTH = 16


class QwenImageFamily(LanguageModelDiTFamily):
    name, title = "qwen-image", "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    denoiser_class = "QwenImageTransformer2DModel"
    prompt_outputs = ("prompt_embeds", "prompt_embeds_mask")
    conditioning_arguments = {"encoder_hidden_states": "prompt_embeds",
                              "encoder_hidden_states_mask": "prompt_embeds_mask"}
    guidance_argument = "true_cfg_scale"
    target_terms = {"attn": (JOINT_ATTENTION,), "attn-ff": (FEED_FORWARD,)}
    reference_configs = {"qwen-image-config": QWEN_IMAGE_CONFIG}
    # two joint blocks of two 8-wide heads over 2x2 patches of a 4-channel latent
    tiny_denoiser_config = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2,
                            "attention_head_dim": 8, "num_attention_heads": 2,
                            "joint_attention_dim": TINY_TEXT_WIDTH, "axes_dims_rope": (2, 2, 4)}
    tiny_vae_widths = (8, 16)  # base_dim x dim_mult: one spatial downsampling

    @classmethod
    def tiny_components(cls) -> dict[str, Any]:
        """Qwen-Image's VAE (random per-channel statistics), a two-layer Qwen2.5-VL with a one-block vision
        tower, and Qwen-Image's scheduler config (exponential dynamic shift, terminal sigma 0.02)."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        channels = 4
        vae = AutoencoderKLQwenImage(base_dim=cls.tiny_vae_widths[0], z_dim=channels, dim_mult=[1, 2],
                                     num_res_blocks=1, temperal_downsample=[False],
                                     latents_mean=(torch.randn(channels) * 0.5).tolist(),
                                     latents_std=(torch.rand(channels) + 0.5).tolist())
        tokenizer = offline_qwen_tokenizer(words=QWEN_PROMPT_TEMPLATE)
        # (Qwen2.5-VL's head size is width / heads)
        text = {**qwen_text_config(tokenizer, layers=2, width=TINY_TEXT_WIDTH), "num_attention_heads": 2,
                "bos_token_id": None,
                "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2],
                                    "rope_theta": 10000.0}}
        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 4,
                  "spatial_merge_size": 1, "temporal_patch_size": 1, "window_size": 8,
                  "out_hidden_size": TINY_TEXT_WIDTH, "fullatt_block_indexes": [0]}
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
            time_shift_type="exponential")
        return {"vae": vae, "tokenizer": tokenizer, "text_encoder": encoder, "scheduler": scheduler}

    # --- geometry: the transformer's own 2x2 patches are the pipeline's packing -------------------

    @classmethod
    def latent_channels(cls, denoiser_config):
        return int(denoiser_config["out_channels"] or denoiser_config["in_channels"] // 4)

    @classmethod
    def vae_scale_factor(cls, vae_config):
        """Qwen-Image's VAE halves the size once per temporal-downsampling flag (one per level)."""
        return 2 ** len(vae_config["temperal_downsample"])

    @classmethod
    def vae_width(cls, vae_config):
        return int(vae_config["base_dim"])

    # Qwen-Image packs 2x2 patches into tokens as FLUX.1 does (its frame axis is one frame)
    pack_latents = FluxFamily.pack_latents
    unpack_latents = FluxFamily.unpack_latents

    @staticmethod
    def _channel_statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    @classmethod
    def normalize_latents(cls, vae, latents):
        mean, std = cls._channel_statistics(vae, latents)
        return (latents - mean) / std

    @classmethod
    def denormalize_latents(cls, vae, latents):
        mean, std = cls._channel_statistics(vae, latents)
        return latents * std + mean

    @classmethod
    def decode_latents(cls, vae, latents):
        frames = cls.denormalize_latents(vae, latents.to(vae.dtype)).unsqueeze(2)
        return vae.decode(frames, return_dict=False)[0][:, :, 0]

    @classmethod
    def modules_without_gradient(cls, denoiser):
        """The last block's text stream ends there: its query, output projection and MLP feed nothing."""
        last = f"transformer_blocks.{len(denoiser.transformer_blocks) - 1}"
        return {f"{last}.attn.add_q_proj", f"{last}.attn.to_add_out", f"{last}.txt_mlp.net.0.proj",
                f"{last}.txt_mlp.net.2"}

    # --- training -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels):
        """The VAE takes (and gives) one frame: (B, 3, 1, H, W)."""
        vae = self.pipeline.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype).unsqueeze(2)).latent_dist
        return posterior.parameters[:, :, 0].float()

    def encode_prompts(self, prompts, with_negative=False):
        """The prompts' hidden states (padded to the longest) and their mask, which the pipeline leaves
        out when nothing is padded: a batch always carries one."""
        encoded = super().encode_prompts(prompts, with_negative)
        embeds = encoded["prompt_embeds"]
        encoded.setdefault("prompt_embeds_mask", torch.ones(embeds.shape[:2], dtype=torch.long,
                                                            device=embeds.device))
        return encoded

    def pipeline_prompt_kwargs(self, prompt):
        with torch.no_grad():
            embeds, mask = self.pipeline.encode_prompt(**self.encode_prompt_kwargs([prompt], False))
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    def extra_model_kwargs(self, noisy, batch):
        """The token grid of each image (frames, rows, columns); no guidance embedding."""
        batch_size, _, height, width = noisy.model_input.shape
        return {"img_shapes": [[(1, height // 2, width // 2)]] * batch_size, "guidance": None}

    def output_to_latent(self, output, noisy):
        _, _, height, width = noisy.model_input.shape
        scale = self.pipeline.vae_scale_factor  # unpacking works in pixels
        return self.unpack_latents(output, height * scale, width * scale, scale)


# The system prompt QwenImagePipeline wraps every prompt in (its words become whole tokens of the tiny
# tokenizer, as in Qwen's vocabulary).
QWEN_PROMPT_TEMPLATE = ("Describe the image by detailing the color, shape, size, texture, quantity, text, "
                        "spatial relationships of the objects and background")
