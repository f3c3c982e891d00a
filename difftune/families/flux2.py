"""FLUX.2: dev (a guidance-distilled MMDiT with a Mistral-3 text encoder) and klein (4B / 9B, Qwen3
text encoder, classifier-free guidance). Both train by flow matching on 2x2 patches of a 32-channel
latent, normalised by the VAE's batch-norm statistics, with the hidden states of three text-encoder
layers stacked as the prompt.

As diffusers' ``train_dreambooth_lora_flux2.py`` / ``_flux2_klein.py`` (and their pipelines) do:
the latent is the posterior's mode, patchified 2x2 and normalised by ``vae.bn``; timesteps are
uniform with unit loss weights and unshifted sigmas (the pipelines shift only for sampling); the
transformer takes the patches as tokens with 4-axis position ids (t, h, w, l) and the timestep in
[0, 1]; dev gets the guidance embedding's value (3.5 in training), klein none. difftune keeps the
latent in the VAE's layout (B, 32, H, W): patchify, normalise and unpatchify are element-wise
permutations, so noise, loss and normalisation are those of the scripts.

Differences from the scripts, on purpose: klein's prompt uses the hidden states its pipeline samples
with (layers 9, 18, 27); the klein script's default ``--text_encoder_out_layers`` is 10, 20, 30, the
dev model's.
"""

from __future__ import annotations

from typing import Any

import torch

from .llm_dit import LanguageModelDiTFamily
from .mmdit import JOINT_ATTENTION
from .tiny import TINY_VAE_WIDTH, offline_chat_tokenizer, tiny_qwen3

# Transformer configs of the published checkpoints (diffusers' convert_flux2_to_diffusers.py).
_FLUX2_COMMON: dict[str, Any] = {"patch_size": 1, "in_channels": 128, "attention_head_dim": 128,
                                 "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
                                 "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6}
FLUX2_DEV_CONFIG = {**_FLUX2_COMMON, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
                    "joint_attention_dim": 15360, "guidance_embeds": True}
FLUX2_KLEIN_4B_CONFIG = {**_FLUX2_COMMON, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                         "joint_attention_dim": 7680, "guidance_embeds": False}
FLUX2_KLEIN_9B_CONFIG = {**_FLUX2_COMMON, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                         "joint_attention_dim": 12288, "guidance_embeds": False}

# The single blocks fuse attention and MLP: one projection in (q, k, v and the MLP's input), one out.
SINGLE_BLOCK_PROJECTIONS = (r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)",
                            "to_qkv_mlp_proj, to_out of the single blocks (attention and MLP fused)")
FEED_FORWARD = (r"ff(_context)?\.linear_(in|out)", "ff, ff_context linear_in, linear_out of the joint blocks")

# ComfyUI reads diffusers' module names of FLUX.2 through its FLUX.1 table (comfy/utils.py
# flux_to_diffusers): the joint blocks' attention and feed-forward, the single blocks' two projections,
# the embedders and the output layers; not the shared modulation layers nor the time/guidance embedder.
COMFYUI_MODULES = (r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
                   r"|ff(_context)?\.linear_(in|out))"
                   r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
                   r"|x_embedder|context_embedder|proj_out|norm_out\.linear")

# The tiny text encoders: prompts are read at these hidden-state layers, so the encoders are that deep.
TINY_TEXT_WIDTH = 16


class Flux2Family(LanguageModelDiTFamily):
    """FLUX.2 [dev]: guidance embedding, Mistral-3 prompts (layers 10, 20, 30)."""

    name, title = "flux2", "FLUX.2"
    pipeline_classes = ("Flux2Pipeline",)
    denoiser_class = "Flux2Transformer2DModel"
    latent_packing = 2
    sample_posterior = False
    family_flags = ("guidance_scale", *LanguageModelDiTFamily.family_flags)
    option_defaults = {**LanguageModelDiTFamily.option_defaults, "guidance_scale": 3.5}  # the dev script's
    prompt_outputs = ("prompt_embeds", None)  # (the text ids follow from the length)
    embedded_guidance = True
    target_terms = {"attn": (JOINT_ATTENTION, SINGLE_BLOCK_PROJECTIONS), "attn-ff": (FEED_FORWARD,)}
    reference_configs = {"flux2-dev-config": FLUX2_DEV_CONFIG}
    comfyui_modules = COMFYUI_MODULES
    tiny_denoiser_config = {
        "patch_size": 1,
        "in_channels": 16,  # 2x2 patches of the tiny VAE's 4 channels
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 3 * TINY_TEXT_WIDTH,  # three hidden-state layers stacked
        "timestep_guidance_channels": 16,
        "mlp_ratio": 3.0,
        "axes_dims_rope": (2, 2, 2, 2),
        "guidance_embeds": True,
    }

    @classmethod
    def tiny_text_stack(cls) -> dict[str, Any]:
        """A Mistral-3 (Pixtral vision tower, 30 text layers) and a tokenizer with Mistral's chat
        format; the real one is a PixtralProcessor, which needs torchvision."""
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        tokenizer = offline_chat_tokenizer(
            ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "<s>", "</s>", "<pad>"),
            MISTRAL_CHAT_TEMPLATE, words=SYSTEM_MESSAGE, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        text = {"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": TINY_TEXT_WIDTH,
                "intermediate_size": 32, "num_hidden_layers": 30, "num_attention_heads": 1,
                "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 1024,
                "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id}
        vision = {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "head_dim": 8, "image_size": 16, "patch_size": 4}
        config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=1,
                                image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
        return {"tokenizer": tokenizer, "text_encoder": Mistral3ForConditionalGeneration(config)}

    @classmethod
    def tiny_components(cls) -> dict[str, Any]:
        """FLUX.2's VAE (random batch-norm statistics, so normalising matters), text stack, FLUX.1-dev's
        scheduler (what the published pipelines ship)."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

        widths = (TINY_VAE_WIDTH, 64)
        vae = AutoencoderKLFlux2(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                 latent_channels=4, sample_size=64)
        channels = vae.bn.num_features
        vae.bn.running_mean.copy_(torch.randn(channels) * 0.5)
        vae.bn.running_var.copy_(torch.rand(channels) * 2 + 0.5)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096)
        return {"vae": vae, **cls.tiny_text_stack(), "scheduler": scheduler}

    # --- latents: the VAE's layout, normalised per 2x2-patch channel -------------------------------

    @staticmethod
    def _patch_statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        return mean, std.to(like.device, like.dtype)

    @classmethod
    def normalize_latents(cls, vae, latents):
        from diffusers import Flux2Pipeline

        patches = Flux2Pipeline._patchify_latents(latents)
        mean, std = cls._patch_statistics(vae, patches)
        return Flux2Pipeline._unpatchify_latents((patches - mean) / std)

    @classmethod
    def denormalize_latents(cls, vae, latents):
        from diffusers import Flux2Pipeline

        patches = Flux2Pipeline._patchify_latents(latents)
        mean, std = cls._patch_statistics(vae, patches)
        return Flux2Pipeline._unpatchify_latents(patches * std + mean)

    @classmethod
    def pack_latents(cls, latents):
        """(B, C, h, w) as the pipelines' ``latents=``: 2x2 patches on channels (B, 4C, h/2, w/2)."""
        from diffusers import Flux2Pipeline

        return Flux2Pipeline._patchify_latents(latents) if latents.dim() == 4 else latents

    @classmethod
    def denoiser_sample(cls, latents):
        """The transformer's tokens: one per 2x2 patch, row by row (B, h/2·w/2, 4C)."""
        from diffusers import Flux2Pipeline

        return Flux2Pipeline._pack_latents(cls.pack_latents(latents))

    @classmethod
    def tokens_to_latents(cls, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens of a (height, width) latent back in the VAE's layout."""
        from diffusers import Flux2Pipeline

        batch, _, channels = tokens.shape
        patches = tokens.permute(0, 2, 1).reshape(batch, channels, height // 2, width // 2)
        return Flux2Pipeline._unpatchify_latents(patches)

    @classmethod
    def unpack_latents(cls, latents, height, width, vae_scale_factor, vae=None):
        """FLUX.2 [dev]'s ``output_type="latent"``: its normalised tokens."""
        if latents.dim() != 3:
            return latents
        return cls.tokens_to_latents(latents, height // vae_scale_factor, width // vae_scale_factor)

    # --- training -----------------------------------------------------------------------------

    def extra_model_kwargs(self, noisy, batch):
        """4-axis position ids of the latent patches (t, row, column, l) and of the prompt tokens
        (0, 0, 0, index); the guidance embedding's value on guidance-distilled models."""
        from diffusers import Flux2Pipeline

        latents = noisy.model_input
        embeds = batch.conditioning["prompt_embeds"]
        kwargs = {"img_ids": Flux2Pipeline._prepare_latent_ids(self.pack_latents(latents)).to(latents.device),
                  "txt_ids": Flux2Pipeline._prepare_text_ids(embeds).to(latents.device), "guidance": None}
        if self.denoiser.config.guidance_embeds:
            kwargs["guidance"] = torch.full((latents.shape[0],), self.options.guidance_scale,
                                            device=latents.device, dtype=latents.dtype)
        return kwargs

    def output_to_latent(self, output, noisy):
        _, _, height, width = noisy.model_input.shape
        return self.tokens_to_latents(output[:, : (height // 2) * (width // 2)], height, width)


class Flux2KleinFamily(Flux2Family):
    """FLUX.2 [klein] 4B / 9B: no guidance embedding (classifier-free guidance when sampling), Qwen3
    prompts (layers 9, 18, 27)."""

    name, title = "flux2-klein", "FLUX.2 klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    family_flags = LanguageModelDiTFamily.family_flags
    option_defaults = LanguageModelDiTFamily.option_defaults
    embedded_guidance = False
    target_terms = {}  # FLUX.2's (the same transformer)
    reference_configs = {"flux2-klein-4b-config": FLUX2_KLEIN_4B_CONFIG,
                         "flux2-klein-9b-config": FLUX2_KLEIN_9B_CONFIG}
    tiny_denoiser_config = {**Flux2Family.tiny_denoiser_config, "guidance_embeds": False}

    @classmethod
    def tiny_text_stack(cls):
        """A 27-layer Qwen3 language model and a Qwen chat tokenizer."""
        tokenizer, encoder = tiny_qwen3(layers=27, width=TINY_TEXT_WIDTH, causal_lm=True)
        return {"tokenizer": tokenizer, "text_encoder": encoder}

    def pipeline_prompt_kwargs(self, prompt):
        """The prompt's and the empty negative prompt's embeddings: klein samples with CFG (and cannot
        encode "" itself once the text encoder is freed)."""
        with torch.no_grad():
            positive, negative = (self.encode_prompts([text])["prompt_embeds"] for text in (prompt, ""))
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    @classmethod
    def unpack_latents(cls, latents, height, width, vae_scale_factor, vae=None):
        """klein's ``output_type="latent"`` gives the VAE's own latent (denormalised): normalise it."""
        if latents.dim() == 3:
            return super().unpack_latents(latents, height, width, vae_scale_factor)
        if vae is None:
            raise ValueError("unpacking FLUX.2 klein latents needs the pipeline's VAE")
        return cls.normalize_latents(vae, latents)


# Mistral's instruction format, written for the tiny tokenizer: system prompt and user turns, text only.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}")
