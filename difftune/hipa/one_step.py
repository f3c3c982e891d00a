"""One denoiser call from pure noise to a clean sample x̂0: the math HiPA trains and samples with.

At the last training timestep the noisy latent is (almost) pure noise, and the
denoiser's output turns into an estimate of the clean latent in closed form:

* ε-prediction:  x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t
* v-prediction:  x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂
* flow matching (SD3, Flux; x_t = (1−σ)·x0 + σ·ε, v = ε − x0):  x̂0 = x_t − σ·v̂

`one_step_scheduler` gives a standard diffusers pipeline the scheduler whose single
step computes exactly this x̂0 from pure noise (DDIM with trailing spacing, so the one
timestep is the last one, and a final ᾱ of 1 so the step returns x̂0 itself; flow
matching schedulers already start at σ = 1 and end at 0). `one_step_timestep` reads the
same timestep for training, so training and sampling cannot disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import DifftuneError
from ..families import ModelFamily, family_of

FLOW_PREDICTION = "flow_prediction"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", FLOW_PREDICTION)


def x0_from_epsilon(epsilon: torch.Tensor, sample: torch.Tensor, alpha_prod: float) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ)·ε̂) / √ᾱ."""
    return (sample - (1.0 - alpha_prod) ** 0.5 * epsilon) / alpha_prod**0.5


def x0_from_v(velocity: torch.Tensor, sample: torch.Tensor, alpha_prod: float) -> torch.Tensor:
    """x̂0 = √ᾱ·x_t − √(1−ᾱ)·v̂ (v = √ᾱ·ε − √(1−ᾱ)·x0)."""
    return alpha_prod**0.5 * sample - (1.0 - alpha_prod) ** 0.5 * velocity


def x0_from_flow(velocity: torch.Tensor, sample: torch.Tensor, sigma: float) -> torch.Tensor:
    """x̂0 = x_t − σ·v̂ (rectified flow: x_t = (1−σ)·x0 + σ·ε, v = ε − x0)."""
    return sample - sigma * velocity


def is_flow_matching(scheduler: Any) -> bool:
    return "FlowMatch" in type(scheduler).__name__


@dataclasses.dataclass(frozen=True)
class OneStepTimestep:
    """The single step: the timestep the denoiser sees and the closed form that gives x̂0."""

    prediction_type: str
    timestep: torch.Tensor  # 0-d, in the scheduler's own dtype and units
    alpha_prod: float | None = None  # ᾱ_t, for DDPM-type (ε / v / sample) models
    sigma: float | None = None  # σ_t, for flow matching

    def x0(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate from the denoiser output at this step."""
        if model_output.shape != sample.shape:
            raise DifftuneError(f"denoiser output {tuple(model_output.shape)} does not match its input "
                                f"{tuple(sample.shape)} (learned-variance models are not supported)")
        if self.prediction_type == "epsilon":
            return x0_from_epsilon(model_output, sample, self.alpha_prod)
        if self.prediction_type == "v_prediction":
            return x0_from_v(model_output, sample, self.alpha_prod)
        if self.prediction_type == "sample":
            return model_output
        return x0_from_flow(model_output, sample, self.sigma)


def one_step_scheduler(scheduler: Any) -> Any:
    """A scheduler that makes a pipeline go from pure noise to x̂0 in one step.

    DDPM-type models get a DDIM scheduler with the same training schedule, trailing
    timestep spacing (one step → the last timestep, T−1) and ``set_alpha_to_one`` (the
    step then returns x̂0 exactly); flow-matching models keep their scheduler class,
    whose one step runs from σ = 1 to 0. The given scheduler is not changed.
    """
    if is_flow_matching(scheduler):
        # (a terminal stretch, Qwen-Image's shift_terminal, divides by zero at one step: σ = 1 → 0 needs none)
        return type(scheduler).from_config(scheduler.config, shift_terminal=None)
    from diffusers import DDIMScheduler

    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise DifftuneError(f"one-step generation: unsupported prediction_type '{prediction_type}' "
                            f"of {type(scheduler).__name__} (supported: {', '.join(PREDICTION_TYPES)})")
    one_step = DDIMScheduler.from_config(
        scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
        clip_sample=False, thresholding=False, prediction_type=prediction_type,
    )
    if prediction_type == "epsilon" and float(one_step.alphas_cumprod[-1]) == 0.0:
        raise DifftuneError("one-step generation: an ε-prediction model with a zero-terminal-SNR schedule "
                            "(rescale_betas_zero_snr) cannot predict x0 from pure noise (ᾱ_T = 0); "
                            "use a v-prediction model")
    return one_step


def one_step_timestep(scheduler: Any) -> OneStepTimestep:
    """The timestep (and ᾱ or σ) that a pipeline with `one_step_scheduler` uses for its one step."""
    one_step = one_step_scheduler(scheduler)
    if is_flow_matching(one_step):
        # σ = 1 is a fixed point of every time shift, so any mu gives the same first step.
        kwargs = {"mu": 0.0} if one_step.config.get("use_dynamic_shifting", False) else {}
        one_step.set_timesteps(1, **kwargs)
        return OneStepTimestep(FLOW_PREDICTION, one_step.timesteps[0], sigma=float(one_step.sigmas[0]))
    one_step.set_timesteps(1)
    timestep = one_step.timesteps[0]
    return OneStepTimestep(one_step.config.prediction_type, timestep,
                           alpha_prod=float(one_step.alphas_cumprod[int(timestep)]))


def predict_x0(denoiser: nn.Module, noise: torch.Tensor, step: OneStepTimestep,
               **conditioning: Any) -> torch.Tensor:
    """x̂0 from pure noise in one denoiser call (differentiable; gradients reach the adapter).

    ``conditioning`` is what the denoiser takes besides the sample and the timestep
    (``encoder_hidden_states``, ``added_cond_kwargs``, ``pooled_projections``, ...).
    """
    timestep = step.timestep.to(noise.device).expand(noise.shape[0])
    model_output = denoiser(noise, timestep=timestep, **conditioning, return_dict=False)[0]
    return step.x0(model_output, noise)


def latent_channels(pipe: Any, denoiser: nn.Module) -> int:
    """Channels of the VAE latent (Flux's transformer takes them packed 2x2, 4x as many)."""
    return family_of(pipe).latent_channels(denoiser.config)


def to_pipeline_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) as the pipeline's ``latents=`` takes them (Flux: packed tokens)."""
    return family_of(pipe).pack_latents(latents)


def from_pipeline_latents(pipe: Any, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pipeline's ``output_type="latent"`` result as (B, C, h, w) (Flux unpacks its tokens)."""
    return family_of(pipe).unpack_latents(latents, height, width, pipe.vae_scale_factor, vae=pipe.vae)


def decode_latents(vae: nn.Module, latents: torch.Tensor,
                   family: type[ModelFamily] = ModelFamily) -> torch.Tensor:
    """VAE-decode latents to pixels in about [-1, 1], undoing the latent scaling as the family's
    pipelines do (`ModelFamily.decode_latents`; the default: shift and scaling factors).

    Differentiable (HiPA's pixel losses back-propagate through the frozen decoder).
    """
    return family.decode_latents(vae, latents)


def generate_one_step(pipe: Any, prompt: str | list[str], guidance_scale: float | None = None,
                      **kwargs: Any):
    """Generate with one denoiser step from pure noise; returns the pipeline's usual output.

    Works on the pipeline of every model family (`difftune.families`: SD, SDXL, SD3, Flux,
    PixArt), with a difftune adapter loaded (``difftune.load_adapter(pipe, path)``) or without.
    The pipeline's scheduler is swapped for `one_step_scheduler` during the call and put back
    afterwards. The student is trained without classifier-free guidance, so by default
    (``None``) the guidance scale is 1.0: one denoiser call per image. On a family whose
    guidance is an embedding (Flux) the guidance scale is that embedding's value instead, and
    ``None`` is the value the trainer's family embeds (3.5 on FLUX.1 and FLUX.2 dev). Other
    keyword arguments (``height``, ``width``, ``generator``, ``latents`` (B, C, h, w; packed
    here for Flux), ``output_type``, ...) go to the pipeline. The same thing by hand, for SD / SDXL::

        pipe.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
        image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

    (SD3 needs no scheduler change: ``num_inference_steps=1`` already starts at σ = 1.)
    """
    if "num_inference_steps" in kwargs or "timesteps" in kwargs or "sigmas" in kwargs:
        raise DifftuneError("generate_one_step: the number of steps is fixed at 1; "
                            "do not pass num_inference_steps, timesteps or sigmas")
    family = family_of(pipe)
    if family.embedded_guidance:  # the embedding's value; None: the one the trainer embeds
        default = family.option_defaults.get("guidance_scale")
        kwargs["guidance_scale"] = default if guidance_scale is None else guidance_scale
    else:
        kwargs.update(family.guidance_kwargs(1.0 if guidance_scale is None else guidance_scale))
    if kwargs.get("latents") is not None:
        kwargs["latents"] = to_pipeline_latents(pipe, kwargs["latents"])
    original = pipe.scheduler
    pipe.scheduler = one_step_scheduler(original)
    try:
        return pipe(prompt=prompt, num_inference_steps=1, **kwargs)
    finally:
        pipe.scheduler = original
