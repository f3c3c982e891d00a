"""What differs between model families during training, behind one interface.

`TrainingFamily` holds the logic every family shares (VAE encoding and latent scaling,
per-example noise with offset, the weighted per-example loss, validation prompts); the
two noise processes add their sampling and targets once each (`NoisePredictionFamily`
for SD 1.x/2.x and SDXL, `FlowMatchingFamily` for SD3), and the concrete families only
say how prompts are encoded and what the denoiser is called with (`FluxFamily` also packs
the latent into 2x2 patches and passes the guidance embedding, as diffusers' Flux
DreamBooth script does).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..model_factory import pipeline_family
from .data import TrainingBatch

SD3_DEFAULTS = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
# diffusers' train_dreambooth_lora_flux.py: uniform timesteps and loss, FLUX.1-dev's distilled guidance
FLUX_DEFAULTS = {"weighting_scheme": "none", "guidance_scale": 3.5, "max_sequence_length": 512}


@dataclasses.dataclass
class LossOptions:
    """Noise, loss-weighting and conditioning options; each family reads the ones that apply to it."""

    noise_offset: float = 0.0
    snr_gamma: float | None = None
    prediction_type: str | None = None
    weighting_scheme: str | None = None  # None: the family's default (SD3 logit_normal, Flux none)
    logit_mean: float = SD3_DEFAULTS["logit_mean"]
    logit_std: float = SD3_DEFAULTS["logit_std"]
    mode_scale: float = SD3_DEFAULTS["mode_scale"]
    precondition_outputs: bool = False
    guidance_scale: float = FLUX_DEFAULTS["guidance_scale"]  # Flux: the guidance embedding's value
    max_sequence_length: int = FLUX_DEFAULTS["max_sequence_length"]  # Flux: T5 tokens per prompt


@dataclasses.dataclass
class NoisyInput:
    """A noised batch: what the denoiser sees and what its output is compared with."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor  # (B,) per-example loss weight
    sigmas: torch.Tensor | None = None  # flow matching only, (B, 1, 1, 1)


def randn_per_example(shape: Sequence[int], generators: Sequence[torch.Generator],
                      device: torch.device) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked (drawn on CPU)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


class TrainingFamily(ABC):
    name: ClassVar[str]
    denoiser_attribute: ClassVar[str] = "unet"

    def __init__(self, pipeline: Any, device: torch.device, options: LossOptions):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.options = options

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_attribute)

    @property
    def text_encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipeline, n, None) for n in names) if m is not None]

    # --- prompts ------------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, prompts: list[str], with_negative: bool = False) -> dict[str, torch.Tensor]:
        """Prompt embeddings keyed by the pipeline's argument names (``prompt_embeds``, ...).

        With ``with_negative`` also the unconditional ones (``negative_prompt_embeds``, ...)
        that classifier-free guidance needs.
        """

    def pipeline_prompt_kwargs(self, prompt: str) -> dict[str, torch.Tensor]:
        """Arguments that let the pipeline sample ``prompt`` without its text encoders."""
        with torch.no_grad():
            return self.encode_prompts([prompt], with_negative=True)

    # --- images -------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior parameters (mean and log-variance on channels), in float32."""
        vae = self.pipeline.vae
        posterior = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return posterior.parameters.float()

    def latents_from_moments(self, moments: torch.Tensor,
                             generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Sample the posterior per example and scale as the denoiser expects."""
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * randn_per_example(mean.shape[1:], generators, mean.device)
        config = self.pipeline.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (sample - shift) * config.scaling_factor

    # --- noise and loss -----------------------------------------------------------------

    def sample_noise(self, latents: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        noise = randn_per_example(latents.shape[1:], generators, latents.device)
        if self.options.noise_offset:
            channels = (latents.shape[1],) + (1,) * (latents.dim() - 2)
            offset = randn_per_example(channels, generators, latents.device)
            noise = noise + self.options.noise_offset * offset
        return noise

    @abstractmethod
    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor,
                  generators: Sequence[torch.Generator]) -> NoisyInput:
        """Draw timesteps per example, noise the latents, give the target and weights."""

    @abstractmethod
    def model_kwargs(self, noisy: NoisyInput, batch: TrainingBatch) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward call."""

    def predict(self, model: nn.Module, noisy: NoisyInput, batch: TrainingBatch) -> torch.Tensor:
        """The denoiser output, in the space of ``noisy.target``."""
        output = model(**self.model_kwargs(noisy, batch), return_dict=False)[0]
        return self.output_to_latent(output, noisy)

    def output_to_latent(self, output: torch.Tensor, noisy: NoisyInput) -> torch.Tensor:
        """The denoiser output in the latent's layout (Flux unpacks its token sequence)."""
        return output

    @staticmethod
    def per_example_loss(prediction: torch.Tensor, noisy: NoisyInput) -> torch.Tensor:
        """Weighted mean squared error of each example, in float32."""
        error = (prediction.float() - noisy.target.float()) ** 2
        return error.flatten(1).mean(1) * noisy.weights


class NoisePredictionFamily(TrainingFamily):
    """DDPM training (SD 1.x/2.x, SDXL): ε, v or x0 targets, optional Min-SNR weighting."""

    def __init__(self, pipeline: Any, device: torch.device, options: LossOptions):
        from diffusers import DDPMScheduler

        super().__init__(pipeline, device, options)
        overrides = {"prediction_type": options.prediction_type} if options.prediction_type else {}
        self.scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, **overrides)
        if options.prediction_type:  # sample with the same parameterisation
            pipeline.scheduler.register_to_config(prediction_type=options.prediction_type)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def add_noise(self, latents, noise, generators):
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])
        timesteps = timesteps.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents
        return NoisyInput(noisy, timesteps, target, self.snr_weights(timesteps))

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ weights (1 without ``snr_gamma``)."""
        gamma = self.options.snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps)
        clipped = torch.clamp(snr, max=gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if self.prediction_type == "epsilon":
            return clipped / snr
        return clipped


class FlowMatchingFamily(TrainingFamily):
    """Rectified-flow training as in diffusers' SD3 and Flux DreamBooth scripts.

    Timesteps and sigmas come from a copy of the pipeline's scheduler, as there: a static
    ``shift`` (SD3) is in its sigmas; with dynamic shifting (FLUX.1) they are unshifted.
    """

    default_weighting_scheme: ClassVar[str] = SD3_DEFAULTS["weighting_scheme"]

    def __init__(self, pipeline: Any, device: torch.device, options: LossOptions):
        from diffusers import FlowMatchEulerDiscreteScheduler

        super().__init__(pipeline, device, options)
        # A private copy: sampling calls set_timesteps on the pipeline's scheduler.
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)

    def add_noise(self, latents, noise, generators):
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        opts = self.options
        scheme = self.weighting_scheme
        density = torch.cat([
            compute_density_for_timestep_sampling(scheme, 1, opts.logit_mean, opts.logit_std,
                                                  opts.mode_scale, generator=g)
            for g in generators])
        steps = self.scheduler.config.num_train_timesteps
        indices = (density * steps).long().clamp(0, steps - 1)
        timesteps = self.scheduler.timesteps[indices].to(latents.device)
        sigmas = self.scheduler.sigmas[indices].to(latents.device, latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if opts.precondition_outputs else noise - latents
        weights = compute_loss_weighting_for_sd3(scheme, sigmas).flatten().float()
        return NoisyInput(noisy, timesteps, target, weights, sigmas)

    @property
    def weighting_scheme(self) -> str:
        return self.options.weighting_scheme or self.default_weighting_scheme

    def predict(self, model, noisy, batch):
        prediction = super().predict(model, noisy, batch)
        if self.options.precondition_outputs:  # x0 = x_t - σ·v
            prediction = prediction * (-noisy.sigmas) + noisy.model_input
        return prediction


class SDFamily(NoisePredictionFamily):
    name = "sd"

    def encode_prompts(self, prompts, with_negative=False):
        embeds, negative = self.pipeline.encode_prompt(prompts, self.device, 1, with_negative)
        out = {"prompt_embeds": embeds}
        if with_negative:
            out["negative_prompt_embeds"] = negative
        return out

    def model_kwargs(self, noisy, batch):
        return {"sample": noisy.model_input, "timestep": noisy.timesteps,
                "encoder_hidden_states": batch.conditioning["prompt_embeds"]}


def _with_pooled(outputs: tuple[torch.Tensor, ...], with_negative: bool) -> dict[str, torch.Tensor]:
    embeds, negative, pooled, negative_pooled = outputs
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if with_negative:
        out.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return out


class SDXLFamily(NoisePredictionFamily):
    name = "sdxl"

    def encode_prompts(self, prompts, with_negative=False):
        outputs = self.pipeline.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=with_negative)
        return _with_pooled(outputs, with_negative)

    def time_ids(self, batch: TrainingBatch, latents: torch.Tensor) -> torch.Tensor:
        """SDXL micro-conditioning: original size, crop corner and target size per example."""
        target = torch.tensor(latents.shape[-2:], device=latents.device) * self.pipeline.vae_scale_factor
        target = target.expand(latents.shape[0], 2)
        return torch.cat([batch.original_sizes, batch.crops_top_left, target], dim=1).float()

    def model_kwargs(self, noisy, batch):
        added = {"text_embeds": batch.conditioning["pooled_prompt_embeds"],
                 "time_ids": self.time_ids(batch, noisy.model_input)}
        return {"sample": noisy.model_input, "timestep": noisy.timesteps,
                "encoder_hidden_states": batch.conditioning["prompt_embeds"], "added_cond_kwargs": added}


class SD3Family(FlowMatchingFamily):
    name = "sd3"
    denoiser_attribute = "transformer"

    def encode_prompts(self, prompts, with_negative=False):
        outputs = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=with_negative)
        return _with_pooled(outputs, with_negative)

    def model_kwargs(self, noisy, batch):
        return {"hidden_states": noisy.model_input, "timestep": noisy.timesteps,
                "encoder_hidden_states": batch.conditioning["prompt_embeds"],
                "pooled_projections": batch.conditioning["pooled_prompt_embeds"]}


class FluxFamily(FlowMatchingFamily):
    """FLUX.1: CLIP pooled + T5 sequence prompts, 2x2-packed latent tokens with position ids,
    timesteps in [0, 1] and, for guidance-distilled models (dev), the guidance embedding."""

    name = "flux"
    denoiser_attribute = "transformer"
    default_weighting_scheme = FLUX_DEFAULTS["weighting_scheme"]

    def encode_prompts(self, prompts, with_negative=False):
        # FLUX.1 is sampled without classifier-free guidance (dev distils it into the guidance
        # embedding), so there is no negative prompt to encode.
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def model_kwargs(self, noisy, batch):
        latents = noisy.model_input
        b, c, h, w = latents.shape
        pipeline_class = type(self.pipeline)
        embeds = batch.conditioning["prompt_embeds"]
        ids = pipeline_class._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        kwargs = {
            "hidden_states": pipeline_class._pack_latents(latents, b, c, h, w),
            "timestep": noisy.timesteps.to(latents.dtype) / 1000,
            "encoder_hidden_states": embeds,
            "pooled_projections": batch.conditioning["pooled_prompt_embeds"],
            "img_ids": ids,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype),
            "guidance": None,
        }
        if self.denoiser.config.guidance_embeds:
            kwargs["guidance"] = torch.full((b,), self.options.guidance_scale, device=latents.device,
                                            dtype=latents.dtype)
        return kwargs

    def output_to_latent(self, output, noisy):
        _, _, h, w = noisy.model_input.shape
        scale = self.pipeline.vae_scale_factor  # _unpack_latents works in pixels
        return type(self.pipeline)._unpack_latents(output, h * scale, w * scale, scale)


FAMILIES: dict[str, type[TrainingFamily]] = {
    cls.name: cls for cls in (SDFamily, SDXLFamily, SD3Family, FluxFamily)}


def training_family(pipeline: Any, device: torch.device, options: LossOptions) -> TrainingFamily:
    """The family object for a loaded pipeline (refuses unsupported pipelines)."""
    return FAMILIES[pipeline_family(pipeline)](pipeline, device, options)
