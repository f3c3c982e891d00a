"""Wan 2.1 / 2.2 text to video: a 3-D DiT (``WanTransformer3DModel``) on the latents of a causal video
VAE (``AutoencoderKLWan``), a UMT5 text encoder, flow matching with a shifted timestep schedule.

Wan 2.2 A14B is the same pipeline (``WanPipeline``) with a second transformer, ``transformer_2``: the
low-noise expert. The pipeline denoises timesteps ``t >= boundary_ratio · 1000`` with ``transformer``
(the high-noise expert) and the rest with ``transformer_2``; ``--expert high|low|both`` trains the
expert(s) of that noise range, each on its own range only.

What diffusers' ``WanPipeline`` does and training mirrors (diffusers 0.42, the ground truth here):

* latents are (B, C, frames, h, w): the VAE keeps the first frame and compresses every 4 more into one
  latent frame (``num_frames = 4k + 1``), and 8x8 pixels into one latent pixel; the transformer patches
  1x2x2 latents into a token;
* the latents are normalised per channel, ``(z - latents_mean) / latents_std`` (the VAE config's
  lists), where image families scale by one factor;
* the denoiser predicts the flow velocity ``noise - x0`` at timestep ``1000 · σ``; the pipeline's
  scheduler shifts its sigmas by ``flow_shift`` (``σ' = s·σ / (1 + (s - 1)·σ)``), and training draws
  its timesteps from the same shifted table, as musubi-tuner's and SimpleTuner's Wan trainers do
  (``--flow_shift``, default: the pipeline scheduler's own);
* prompts are UMT5 embeddings of ``max_sequence_length`` tokens (512, the pipeline's default), zeroed
  past the prompt's end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DifftuneError
from .base import FlowMatchingFamily, LoraKeyLayout, NoisyInput, randn_per_example
from .tiny import offline_t5_tokenizer

# The public transformer configs of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers; each of the two
# experts of Wan2.2-T2V-A14B-Diffusers has the 14B layout.
WAN21_1_3B_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
WAN21_14B_TRANSFORMER_CONFIG: dict[str, Any] = {
    **WAN21_1_3B_TRANSFORMER_CONFIG, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
WAN22_A14B_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's model_index.json

EXPERTS = ("high", "low", "both")
HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"

# The feed-forward network of every block (diffusers names it ffn, not ff)
FEED_FORWARD = (r"ffn\.net\.(0\.proj|2)", "ffn.net.0.proj, ffn.net.2 of every block")

# diffusers module path -> the original Wan checkpoint's (Wan-Video/Wan2.1 modules/model.py), which
# ComfyUI's Wan model keeps and diffusers' convert_wan_transformer_to_diffusers maps back.
ORIGINAL_NAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("proj_out", "head.head"),
)
ORIGINAL_IN_BLOCK = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v",
                     "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img",
                     "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def original_module_path(component: str, module: str, denoiser_config: Any = None) -> str:
    """A transformer module's name in the original Wan checkpoints (``blocks.0.attn1.to_q`` →
    ``blocks.0.self_attn.q``), which ComfyUI's Wan model uses."""
    for ours, theirs in ORIGINAL_NAMES:
        if module == ours:
            return theirs
    parts = module.split(".")
    if parts[0] != "blocks" or len(parts) < 4:
        raise DifftuneError(f"Wan transformer module '{module}' has no name in the original Wan layout")
    head, rest = ".".join(parts[:2]), ".".join(parts[2:])
    if rest in ORIGINAL_IN_BLOCK:  # ffn.net.0.proj
        return f"{head}.{ORIGINAL_IN_BLOCK[rest]}"
    attention, _, projection = rest.partition(".")
    if attention not in ORIGINAL_IN_BLOCK or projection not in ORIGINAL_IN_BLOCK:
        raise DifftuneError(f"Wan transformer module '{module}' has no name in the original Wan layout")
    return f"{head}.{ORIGINAL_IN_BLOCK[attention]}.{ORIGINAL_IN_BLOCK[projection]}"


# ComfyUI's generic LoRA keys for a model it loads: ``diffusion_model.<module of its Wan model>`` with
# lora_down/lora_up/alpha (comfy/lora.py model_lora_keys_unet); diffusers reads the same file
# (_convert_non_diffusers_wan_lora_to_diffusers).
COMFYUI_NAMES = LoraKeyLayout({HIGH_NOISE: "diffusion_model", LOW_NOISE: "diffusion_model"}, separator=".",
                              module_path=original_module_path)

TINY_Z_DIM = 4
# per-channel statistics of the tiny VAE's latents (arbitrary, not 0 and 1: the normalisation shows)
TINY_LATENTS_MEAN = [0.2, -0.1, 0.05, -0.3]
TINY_LATENTS_STD = [1.5, 0.8, 1.2, 2.0]
TINY_VAE_BASE_DIM = 8


def tiny_wan_vae():
    """A small AutoencoderKLWan with Wan's geometry: 8x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=TINY_VAE_BASE_DIM, z_dim=TINY_Z_DIM, dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, temperal_downsample=[False, True, True],
                            latents_mean=TINY_LATENTS_MEAN, latents_std=TINY_LATENTS_STD)


def tiny_umt5_encoder(tokenizer) -> nn.Module:
    """A 2-layer, 32-wide UMT5 encoder (Wan's text encoder class) that fits ``tokenizer``."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


class WanFamily(FlowMatchingFamily):
    name = "wan"
    title = "Wan"
    pipeline_classes = ("WanPipeline",)
    denoiser_class = "WanTransformer3DModel"
    text_encoder_components = ("text_encoder",)
    video = True
    expert_components = (HIGH_NOISE, LOW_NOISE)
    default_sample_size = 60  # WanPipeline's default height, 480 px (its width is 832)
    family_flags = ("max_sequence_length", "flow_shift", "expert")
    # uniform timesteps from the shifted table, unit weights (musubi-tuner's `shift` sampling); UMT5
    # prompts of 512 tokens, as the pipeline samples them
    option_defaults = {**FlowMatchingFamily.option_defaults, "weighting_scheme": "none",
                       "max_sequence_length": 512, "expert": "high"}
    prompt_outputs = ("prompt_embeds", "negative_prompt_embeds")
    target_terms = {"attn-ff": (FEED_FORWARD,)}
    one_step = False
    lora_layouts = {"comfyui": COMFYUI_NAMES}
    export_refusals = {
        "kohya": "Wan has no kohya LoRA naming for A1111 (which has no video model); use --format comfyui "
                 "(the original Wan names ComfyUI's Wan loader and diffusers read)",
        "single-file": "Wan is not exported as one merged checkpoint; use --format diffusers",
    }
    reference_configs = {"wan2.1-1.3b-config": WAN21_1_3B_TRANSFORMER_CONFIG,
                         "wan2.1-14b-config": WAN21_14B_TRANSFORMER_CONFIG,
                         "wan2.2-a14b-expert-config": WAN21_14B_TRANSFORMER_CONFIG}
    tiny_vae_widths = (TINY_VAE_BASE_DIM,) * 4  # 8x spatial compression, as the real VAE
    # ``builtin:tiny-wan22``: the Wan 2.2 A14B layout, two experts and their boundary
    tiny_variants = {"wan22": {"experts": True}}
    # Wan2.1's layout at a tiny width (as diffusers' own Wan tests size it)
    tiny_denoiser_config = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": TINY_Z_DIM,
        "out_channels": TINY_Z_DIM,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    }

    @classmethod
    def tiny_components(cls, experts: bool = False):
        """The tiny VAE, a UMT5 encoder with the offline T5 tokenizer, Wan's UniPC flow sampler and, for
        the Wan 2.2 layout, the low-noise expert and Wan2.2-A14B's boundary."""
        from diffusers import UniPCMultistepScheduler

        vae, tokenizer = tiny_wan_vae(), offline_t5_tokenizer()
        components = {"vae": vae, "tokenizer": tokenizer, "text_encoder": tiny_umt5_encoder(tokenizer),
                      "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                           use_flow_sigmas=True, flow_shift=3.0)}
        if experts:
            components.update({LOW_NOISE: cls.tiny_denoiser(), "boundary_ratio": WAN22_A14B_BOUNDARY_RATIO})
        return components

    # --- geometry ------------------------------------------------------------------------------

    @classmethod
    def latent_patch(cls, denoiser_config: Mapping[str, Any]) -> int:
        return int(denoiser_config["patch_size"][-1])

    @classmethod
    def vae_scale_factor(cls, vae_config: Mapping[str, Any]) -> int:
        return int(vae_config.get("scale_factor_spatial") or 8)

    @classmethod
    def vae_width(cls, vae_config: Mapping[str, Any]) -> int:
        return int(vae_config["base_dim"])

    @classmethod
    def frame_multiple(cls, vae_config: Mapping[str, Any]) -> int:
        """Frames after the first that make one latent frame: clips have 1 + k·this frames."""
        return int(vae_config.get("scale_factor_temporal") or 4)

    @classmethod
    def model_experts(cls, model_index: Mapping[str, Any]) -> tuple[str, ...]:
        """The experts a folder's model_index.json holds (Wan 2.2: both transformers and a boundary)."""
        present = [name for name in cls.expert_components
                   if isinstance(model_index.get(name), (list, tuple)) and model_index[name][0] is not None]
        return tuple(present) if len(present) > 1 and model_index.get("boundary_ratio") else ()

    @classmethod
    def tiny_experts(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        return cls.expert_components if options.get("experts") else ()

    @classmethod
    def diffusers_lora_loading(cls, component: str) -> tuple[str, dict[str, Any]]:
        """WanPipeline reads every expert's LoRA under ``transformer.``; the low-noise one is loaded with
        ``load_into_transformer_2=True`` (diffusers' WanLoraLoaderMixin)."""
        if component == LOW_NOISE:
            return HIGH_NOISE, {"load_into_transformer_2": True}
        return component, {}

    # --- training ------------------------------------------------------------------------------

    def __init__(self, pipeline: Any, device: torch.device, options):
        super().__init__(pipeline, device, options)
        experts = self.pipeline_experts(pipeline)
        if self.options.expert != "high" and not experts:
            raise DifftuneError(f"--expert {self.options.expert}: this Wan model has one transformer (Wan "
                                "2.1); --expert chooses between Wan 2.2's high- and low-noise experts")
        steps = pipeline.scheduler.config.num_train_timesteps
        self.boundary = float(pipeline.config.boundary_ratio) * steps if experts else None

    def training_scheduler(self):
        """The pipeline's sampler shifts its flow sigmas by flow_shift (UniPC) or shift (Euler); training
        draws from a table shifted the same way (or by --flow_shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = self.pipeline.scheduler.config
        shift = self.options.flow_shift or config.get("flow_shift") or config.get("shift") or 1.0
        self.flow_shift = float(shift)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps,
                                               shift=self.flow_shift)

    @staticmethod
    def pipeline_experts(pipeline: Any) -> bool:
        return (getattr(pipeline, LOW_NOISE, None) is not None
                and getattr(pipeline.config, "boundary_ratio", None) is not None)

    @property
    def denoiser(self) -> nn.Module:
        """The transformer training adapts: the low-noise expert under ``--expert low``."""
        return getattr(self.pipeline, LOW_NOISE if self.options.expert == "low" else HIGH_NOISE)

    def trained_denoisers(self) -> dict[str, nn.Module]:
        names = {"high": (HIGH_NOISE,), "low": (LOW_NOISE,), "both": (HIGH_NOISE, LOW_NOISE)}
        return {name: getattr(self.pipeline, name) for name in names[self.options.expert]}

    def encode_prompt_kwargs(self, prompts, with_negative):
        return {"prompt": prompts, "do_classifier_free_guidance": with_negative, "num_videos_per_prompt": 1,
                "max_sequence_length": self.options.max_sequence_length, "device": self.device}

    def latents_from_moments(self, moments: torch.Tensor,
                             generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Sample the posterior per example, then normalise per channel as WanPipeline undoes it."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * randn_per_example(mean.shape[1:], generators, mean.device)
        return normalize_latents(sample, self.pipeline.vae.config)

    def add_noise(self, latents, noise, generators):
        """Flow matching on the shifted table; under --expert high/low the timesteps are drawn from that
        expert's range only (t >= boundary: high noise), spread as the density spreads them."""
        if self.boundary is None or self.options.expert == "both":
            return super().add_noise(latents, noise, generators)
        high = self.scheduler.timesteps >= self.boundary
        offset = 0 if self.options.expert == "high" else int(high.sum())
        count = int(high.sum()) if self.options.expert == "high" else int((~high).sum())
        return self._noise_at_indices(latents, noise, generators, offset, count)

    def _noise_at_indices(self, latents, noise, generators, offset, count):
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        opts = self.options
        density = torch.cat([
            compute_density_for_timestep_sampling(self.weighting_scheme, 1, opts.logit_mean, opts.logit_std,
                                                  opts.mode_scale, generator=g)
            for g in generators])
        indices = offset + (density * count).long().clamp(0, count - 1)
        timesteps = self.scheduler.timesteps[indices].to(latents.device)
        sigmas = self.scheduler.sigmas[indices].to(latents.device, latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if opts.precondition_outputs else noise - latents
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).flatten().float()
        return NoisyInput(noisy, timesteps, target, weights, sigmas)

    def denoiser_timestep(self, noisy):
        """The pipeline's timestep; per token where the pipeline expands it (Wan2.2 TI2V-5B)."""
        if getattr(self.pipeline.config, "expand_timesteps", False):
            latents = noisy.model_input
            tokens = latents.shape[2] * (latents.shape[3] // 2) * (latents.shape[4] // 2)
            return noisy.timesteps[:, None].expand(latents.shape[0], tokens)
        return noisy.timesteps

    def predict(self, model, noisy, batch):
        """Under --expert both each example goes to the expert of its timestep: ``model`` (the
        prepared high-noise transformer) or the low-noise one."""
        if self.options.expert != "both":
            return super().predict(model, noisy, batch)
        high = noisy.timesteps >= self.boundary
        parts, order = [], []
        for mask, module in ((high, model), (~high, self.pipeline.transformer_2)):
            if mask.any():
                parts.append(super().predict(module, select(noisy, mask), select(batch, mask)))
                order.append(mask.nonzero().flatten())
        return torch.cat(parts)[torch.argsort(torch.cat(order))]


def normalize_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """``(z - latents_mean) / latents_std`` per channel: the inverse of WanPipeline's decoding step."""
    shape = (1, -1) + (1,) * (latents.dim() - 2)
    mean = torch.tensor(vae_config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
    std = torch.tensor(vae_config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
    return (latents - mean) / std


def select(value: Any, mask: torch.Tensor) -> Any:
    """The examples of a `NoisyInput` or `TrainingBatch` where ``mask`` is set."""
    import dataclasses

    def part(field: Any) -> Any:
        if isinstance(field, torch.Tensor) and field.dim() > 0 and field.shape[0] == mask.shape[0]:
            return field[mask]
        if isinstance(field, dict):
            return {key: part(each) for key, each in field.items()}
        if isinstance(field, list) and len(field) == mask.shape[0]:
            return [each for each, keep in zip(field, mask.tolist(), strict=True) if keep]
        return field

    fields = dataclasses.fields(value)
    return dataclasses.replace(value, **{f.name: part(getattr(value, f.name)) for f in fields})

