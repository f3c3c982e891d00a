"""Model families: noising, targets and loss weights against closed forms; prompts and conditions
against the diffusers pipelines themselves."""

import math

import numpy as np
import pytest
import torch
from conftest import build, generate

from difftune.families import (
    DDPMFamily,
    FlowMatchingFamily,
    LossOptions,
    TrainingBatch,
    training_family,
)
from difftune.families.sd import SDFamily

CPU = torch.device("cpu")


def generators(count, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def alphas_cumprod(config):
    """The scaled-linear DDPM schedule, written out."""
    betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps) ** 2
    return torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_noise_target_and_min_snr_weights(prediction_type):
    pipe = SDFamily.build_tiny(prediction_type=prediction_type)
    family = training_family(pipe, CPU, LossOptions(snr_gamma=5.0))
    assert isinstance(family, DDPMFamily) and family.prediction_type == prediction_type
    latents = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    noisy = family.add_noise(latents, noise, generators(3))
    t = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators(3)])
    assert torch.equal(noisy.timesteps, t)
    a = alphas_cumprod(pipe.scheduler.config)[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy.model_input, a.sqrt() * latents + (1 - a).sqrt() * noise, atol=1e-5)
    expected = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(noisy.target, expected, atol=1e-5)
    snr = (a / (1 - a)).flatten()
    clipped = torch.minimum(snr, torch.tensor(5.0))
    weight = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    assert torch.allclose(noisy.weights, weight, rtol=1e-4)
    plain = training_family(pipe, CPU, LossOptions()).add_noise(latents, noise, generators(3))
    assert torch.equal(plain.weights, torch.ones(3))


def test_prediction_type_override_reaches_training_and_sampling():
    pipe = SDFamily.build_tiny()
    family = training_family(pipe, CPU, LossOptions(prediction_type="v_prediction"))
    assert family.prediction_type == "v_prediction"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt", "mode", "cosmap", "none"])
def test_flow_matching_noise_target_and_weights(scheme):
    pipe = build("sd3")
    options = LossOptions(weighting_scheme=scheme, logit_mean=0.3, logit_std=0.7, mode_scale=1.29)
    family = training_family(pipe, CPU, options)
    assert isinstance(family, FlowMatchingFamily)
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    noisy = family.add_noise(latents, noise, generators(4))
    # the density written out: logit-normal, the "mode" warp, else uniform
    u = []
    for g in generators(4):
        if scheme == "logit_normal":
            u.append(torch.sigmoid(torch.normal(0.3, 0.7, (1,), generator=g)))
        else:
            r = torch.rand((1,), generator=g)
            u.append(1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r) if scheme == "mode" else r)
    index = (torch.cat(u) * 1000).long().clamp(0, 999)
    shift = pipe.scheduler.config.shift
    sigma = shift * (1 - index / 1000) / (1 + (shift - 1) * (1 - index / 1000))  # shifted linear schedule
    sigma = sigma.float().view(-1, 1, 1, 1)
    assert torch.allclose(noisy.sigmas, sigma, atol=1e-5)
    assert torch.allclose(noisy.timesteps, sigma.flatten() * 1000, atol=1e-2)
    assert torch.allclose(noisy.model_input, (1 - sigma) * latents + sigma * noise, atol=1e-5)
    assert torch.allclose(noisy.target, noise - latents)
    expected = {"sigma_sqrt": sigma ** -2, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}.get(
        scheme, torch.ones_like(sigma))
    assert torch.allclose(noisy.weights, expected.flatten(), rtol=1e-5)


def test_preconditioned_sd3_predicts_x0():
    pipe = build("sd3")
    family = training_family(pipe, CPU, LossOptions(precondition_outputs=True))
    latents, noise = torch.randn(1, 4, 32, 32), torch.randn(1, 4, 32, 32)
    noisy = family.add_noise(latents, noise, generators(1))
    assert torch.equal(noisy.target, latents)
    batch = TrainingBatch(None, family.encode_prompts(["a dog"]), None, None, None, [])
    with torch.no_grad():
        raw = pipe.transformer(hidden_states=noisy.model_input, timestep=noisy.timesteps,
                               encoder_hidden_states=batch.conditioning["prompt_embeds"],
                               pooled_projections=batch.conditioning["pooled_prompt_embeds"]).sample
        prediction = family.predict(pipe.transformer, noisy, batch)
    assert torch.allclose(prediction, noisy.model_input - noisy.sigmas * raw, atol=1e-6)


def test_latents_are_sampled_and_scaled_per_family(family):
    pipe = build(family)
    fam = training_family(pipe, CPU, LossOptions())
    frames = (5,) if fam.video else ()  # a clip: (B, 3, frames, H, W)
    pixels = torch.rand(2, 3, *frames, 64, 64) * 2 - 1
    moments = fam.encode_images(pixels)
    with torch.no_grad():
        # a video VAE under an image family (Qwen-Image's): one frame in and out
        one_frame = not fam.video and pipe.vae.encoder.conv_in.weight.dim() == 5
        posterior = pipe.vae.encode(pixels.unsqueeze(2) if one_frame else pixels).latent_dist
    if one_frame:
        posterior = type(posterior)(posterior.parameters[:, :, 0])
    assert torch.allclose(moments, posterior.parameters)
    latents = fam.latents_from_moments(moments, generators(2, seed=7))
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in generators(2, seed=7)])
    # a posterior sample, or its mode where the family's training script takes that (FLUX.2, Z-Image)
    raw = posterior.mean + posterior.std * eps if fam.sample_posterior else posterior.mean
    config = pipe.vae.config
    if fam.video:  # per-channel statistics (Wan's VAE)
        shape = (1, -1) + (1,) * (raw.dim() - 2)
        expected = (raw - torch.tensor(config.latents_mean).view(shape)) / torch.tensor(
            config.latents_std).view(shape)
        assert torch.allclose(latents, expected, atol=1e-5)
        return
    assert torch.allclose(fam.denormalize_latents(pipe.vae, latents), raw, atol=1e-5)
    if hasattr(config, "scaling_factor"):  # shift and scale (per-channel statistics: family tests)
        expected = (raw - (config.shift_factor or 0.0)) * config.scaling_factor
        assert torch.allclose(latents, expected, atol=1e-5)


def test_noise_offset_adds_a_per_channel_constant():
    fam = training_family(build("sd"), CPU, LossOptions(noise_offset=0.1))
    latents = torch.zeros(2, 4, 8, 8)
    noise = fam.sample_noise(latents, generators(2))
    base = torch.stack([torch.randn(4, 8, 8, generator=g) for g in generators(2)])
    offset = noise - base
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)
    assert 0 < offset.abs().max() < 1.0


def test_prompt_embeddings_match_the_pipeline_and_sample_identically(family):
    pipe = build(family)
    fam = training_family(pipe, CPU, LossOptions())
    with torch.no_grad():
        ours = fam.encode_prompts(["a sks dog", "a dog"])
    first = fam.pipeline_prompt_kwargs("a sks dog")
    embeds = first["prompt_embeds"]
    if isinstance(embeds, list):  # Z-Image's pipeline takes a list of prompts of their own lengths
        embeds = embeds[0][None]
    assert torch.equal(ours["prompt_embeds"][:1, : embeds.shape[1]], embeds)

    assert np.allclose(generate(pipe, prompt="a sks dog"), generate(pipe, prompt=None, **first), atol=1e-6)


def test_sdxl_conditions_are_the_pipeline_time_ids():
    pipe = build("sdxl")
    fam = training_family(pipe, CPU, LossOptions())
    latents = torch.randn(2, 4, 32, 32)
    batch = TrainingBatch(None, {}, torch.tensor([[100, 120], [64, 64]]), torch.tensor([[3, 5], [0, 0]]),
                          None, [])
    ids = fam.time_ids(batch, latents)
    projection = pipe.text_encoder_2.config.projection_dim
    for row, (size, crop) in enumerate([((100, 120), (3, 5)), ((64, 64), (0, 0))]):
        reference = pipe._get_add_time_ids(size, crop, (64, 64), torch.float32, projection)
        assert torch.equal(ids[row:row + 1], reference)


def test_per_example_loss_is_the_weighted_mean_squared_error():
    from difftune.families import NoisyInput

    target = torch.randn(3, 4, 2, 2)
    prediction = torch.randn(3, 4, 2, 2)
    weights = torch.tensor([1.0, 0.5, 2.0])
    loss = DDPMFamily.per_example_loss(prediction, NoisyInput(None, None, target, weights))
    expected = torch.stack([((prediction[i] - target[i]) ** 2).mean() * weights[i] for i in range(3)])
    assert torch.allclose(loss, expected)
