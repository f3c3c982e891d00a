"""PixArt-α / PixArt-Σ: a DiT with cross-attention to T5 embeddings, DDPM noise and a learned variance
(the transformer's second half of output channels, which training and sampling leave aside)."""

from __future__ import annotations

import torch

from .base import DDPMFamily
from .tiny import TINY_SAMPLE_SIZE, offline_t5_tokenizer, tiny_t5_encoder, tiny_vae

NO_LORA_LOADER = ("diffusers' PixArt pipelines have no LoRA loader to check such a file against; "
                  "export with --format diffusers (a merged pipeline folder)")


class PixArtFamily(DDPMFamily):
    name = "pixart"
    title = "PixArt"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    pipeline_prefix = "PixArt"
    denoiser_class = "PixArtTransformer2DModel"
    text_encoder_components = ("text_encoder",)
    prompt_outputs = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                      "negative_prompt_attention_mask")
    conditioning_arguments = {"encoder_hidden_states": "prompt_embeds",
                              "encoder_attention_mask": "prompt_attention_mask"}
    diffusers_loads_lora = False
    export_refusals = {"kohya": NO_LORA_LOADER, "comfyui": NO_LORA_LOADER, "diff": NO_LORA_LOADER}
    tiny_denoiser_config = {
        "sample_size": TINY_SAMPLE_SIZE,
        "patch_size": 2,
        "in_channels": 4,
        "out_channels": 8,  # learned variance, as PixArt-α
        "num_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "cross_attention_dim": 32,
        "caption_channels": 32,  # the T5 encoder's width
        "norm_num_groups": None,
    }
    # PixArt's pipeline bins sizes for a VAE that shrinks 8 times (sample 32: 256 px): so does this one
    tiny_vae_widths = (8, 16, 32, 32)

    @classmethod
    def tiny_components(cls):
        """A T5 encoder and PixArt-α's DPM-Solver."""
        from diffusers import DPMSolverMultistepScheduler

        vae, tokenizer = tiny_vae(widths=cls.tiny_vae_widths, norm_num_groups=8), offline_t5_tokenizer()
        scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                                prediction_type="epsilon")
        return {"vae": vae, "tokenizer": tokenizer, "text_encoder": tiny_t5_encoder(tokenizer),
                "scheduler": scheduler}

    def encode_prompt_kwargs(self, prompts, with_negative):
        # clean_caption needs bs4 and ftfy and only normalises web captions
        return {"prompt": prompts, "do_classifier_free_guidance": with_negative, "negative_prompt": "",
                "num_images_per_prompt": 1, "device": self.device, "clean_caption": False}

    def pipeline_prompt_kwargs(self, prompt):
        # the pipeline's negative prompt defaults to "", which it refuses beside negative embeddings
        return {**super().pipeline_prompt_kwargs(prompt), "negative_prompt": None}

    def extra_model_kwargs(self, noisy, batch):
        """PixArt-α at 1024 px is conditioned on the image size and aspect ratio, as its pipeline does."""
        latents = noisy.model_input
        if not self.denoiser.use_additional_conditions:
            return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        height, width = (side * self.pipeline.vae_scale_factor for side in latents.shape[-2:])
        size = torch.tensor([[height, width]], device=latents.device, dtype=latents.dtype)
        ratio = torch.tensor([[height / width]], device=latents.device, dtype=latents.dtype)
        batch_size = latents.shape[0]
        return {"added_cond_kwargs": {"resolution": size.expand(batch_size, 2),
                                      "aspect_ratio": ratio.expand(batch_size, 1)}}

    def output_to_latent(self, output, noisy):
        """The prediction without the learned variance (as the pipeline samples)."""
        channels = noisy.model_input.shape[1]
        return output[:, :channels] if output.shape[1] == 2 * channels else output
