"""Z-Image (Turbo and base): a 6B single-stream DiT (S3-DiT) over FLUX.1's 16-channel VAE, prompted by
the second-to-last hidden state of a Qwen3 text model, trained by flow matching.

As diffusers' ``train_dreambooth_lora_z_image.py`` does: the posterior's mode, shifted and scaled by the
VAE's factors; uniform timesteps with unit weights and the scheduler's sigmas (a static shift of 3 on
the published models); the transformer takes a list of one-frame latents (C, 1, H, W), the time as
``1 - σ`` and a list of prompts of their own lengths, and predicts ``x0 − noise`` (the negative of the
flow target). Classifier-free guidance in its pipeline is ``pos + g·(pos − neg)``: g = 0 is none.
"""

from __future__ import annotations

from typing import Any

import torch

from .llm_dit import LanguageModelDiTFamily
from .tiny import tiny_qwen3, tiny_vae

# The public Z-Image transformer config (Tongyi-MAI/Z-Image-Turbo and Z-Image share it).
Z_IMAGE_CONFIG: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": (32, 48, 48),
    "axes_lens": (1024, 512, 512),
}

FEED_FORWARD = (r"feed_forward\.w[123]", "feed_forward w1, w2, w3 of every block")

# ComfyUI loads Z-Image as a Lumina 2 model and maps diffusers' names to its own (comfy/utils.py
# z_image_to_diffusers, q/k/v as slices of one fused weight): every block's attention, feed-forward and
# modulation, the embedders and the final layer.
COMFYUI_MODULES = (r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(to_[qkv]|to_out\.0)"
                   r"|feed_forward\.w[123]|adaLN_modulation\.0)"
                   r"|all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|all_x_embedder\.2-1|cap_embedder\.1"
                   r"|t_embedder\.mlp\.[02]")

TINY_TEXT_WIDTH = 16


def pad_prompts(embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of their own lengths as one zero-padded batch (B, L, D) and its mask (B, L)."""
    length = max(e.shape[0] for e in embeddings)
    padded = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[0])) for e in embeddings])
    mask = torch.stack([torch.arange(length, device=e.device) < e.shape[0] for e in embeddings])
    return padded, mask


def unpad_prompts(padded: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [embeds[keep] for embeds, keep in zip(padded, mask.bool(), strict=True)]


class ZImageFamily(LanguageModelDiTFamily):
    name, title = "z-image", "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    denoiser_class = "ZImageTransformer2DModel"
    sample_posterior = False
    prompt_outputs = ("prompt_embeds", "negative_prompt_embeds")
    unguided_scale = 0.0
    target_terms = {"attn-ff": (FEED_FORWARD,)}  # (its attention is diffusers' to_q/k/v/out.0)
    reference_configs = {"z-image-config": Z_IMAGE_CONFIG}
    comfyui_modules = COMFYUI_MODULES
    tiny_denoiser_config = {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 4,
        "dim": 16,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "cap_feat_dim": TINY_TEXT_WIDTH,
        "axes_dims": (2, 2, 4),
        "axes_lens": (1024, 64, 64),
    }

    @classmethod
    def tiny_components(cls) -> dict[str, Any]:
        """FLUX.1's VAE layout, a two-layer Qwen3 model, Z-Image-Turbo's scheduler (static shift 3)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        vae = tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                       use_post_quant_conv=False)
        tokenizer, encoder = tiny_qwen3(layers=2, width=TINY_TEXT_WIDTH)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                    use_dynamic_shifting=False)
        return {"vae": vae, "tokenizer": tokenizer, "text_encoder": encoder, "scheduler": scheduler}

    @classmethod
    def latent_patch(cls, denoiser_config):
        """The transformer patchifies 2x2 itself (the pipeline's ``patch_size``)."""
        return int(next(iter(denoiser_config.get("all_patch_size") or (2,))))

    # --- training -----------------------------------------------------------------------------

    def encode_prompt_kwargs(self, prompts, with_negative):
        # a copy: the pipeline writes the chat-formatted prompts into the list it is given
        return {"prompt": list(prompts), "device": self.device, "do_classifier_free_guidance": with_negative,
                "max_sequence_length": self.options.max_sequence_length}

    def encode_prompts(self, prompts, with_negative=False):
        """The pipeline's per-prompt hidden states as a padded batch with masks (a batch is one
        tensor in difftune; `model_kwargs` gives the transformer its list back)."""
        positive, negative = self.pipeline.encode_prompt(**self.encode_prompt_kwargs(prompts, with_negative))
        embeds, mask = pad_prompts(positive)
        encoded = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
        if with_negative:
            encoded["negative_prompt_embeds"], encoded["negative_prompt_embeds_mask"] = pad_prompts(negative)
        return encoded

    def pipeline_prompt_kwargs(self, prompt):
        with torch.no_grad():
            positive, negative = self.pipeline.encode_prompt(**self.encode_prompt_kwargs([prompt], True))
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def denoiser_timestep(self, noisy):
        return (1000 - noisy.timesteps.to(noisy.model_input.dtype)) / 1000  # 1 − σ

    def model_kwargs(self, noisy, batch):
        """A list of one-frame latents, the time, a list of unpadded prompts."""
        conditioning = batch.conditioning
        return {"x": list(noisy.model_input.unsqueeze(2).unbind(0)), "t": self.denoiser_timestep(noisy),
                "cap_feats": unpad_prompts(conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"])}

    def output_to_latent(self, output, noisy):
        """The stacked predictions, negated: the transformer predicts x0 − noise."""
        return -torch.stack(list(output)).squeeze(2)
