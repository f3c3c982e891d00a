"""A HiPA training step on the trainer's families: batches, gradient paths, and that training fits."""

import pytest
import torch
from test_loss import natural_image

import difftune
from difftune.families import LossOptions, training_family
from difftune.families.sd import SDFamily
from difftune.families.sd3 import SD3Family
from difftune.families.sdxl import SDXLFamily
from difftune.hipa.loss import HiPALoss
from difftune.hipa.one_step import decode_latents, one_step_timestep, predict_x0
from difftune.hipa.teacher import TeacherSettings, generate_teacher_samples
from difftune.hipa.training import OneStepData, one_step_loss, predict_x0_with_family

SIZE = 32
PROMPTS = ["a red circle", "a blue square", "a green star"]
BUILDERS = {
    "sd": SDFamily.build_tiny,
    "sd-v": lambda: SDFamily.build_tiny(prediction_type="v_prediction"),
    "sdxl": SDXLFamily.build_tiny,
    "sd3": SD3Family.build_tiny,
}


def setup(name, tmp_path, prompts=PROMPTS, rank=4):
    pipe = BUILDERS[name]()
    cache = generate_teacher_samples(pipe, prompts, tmp_path / name, TeacherSettings(num_inference_steps=2,
                                     guidance_scale=1.0), height=SIZE, width=SIZE, show_progress=False)
    family = training_family(pipe, torch.device("cpu"), LossOptions())
    pipe.vae.requires_grad_(False)
    for encoder in family.text_encoders:
        encoder.requires_grad_(False)
    difftune.add_adapter(family.denoiser, "lora", rank=rank)
    data = OneStepData(cache, family.encode_prompts, seed=3, device="cpu")
    return pipe, cache, family, data


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_prediction_equals_the_plain_one_step_call(name, tmp_path):
    """The trainer's conditioning path gives the same x̂0 as calling the denoiser directly."""
    pipe, cache, family, data = setup(name, tmp_path, PROMPTS[:1])
    batch = data.batch([0])
    step = one_step_timestep(pipe.scheduler)
    with torch.no_grad():
        via_family = predict_x0_with_family(family, family.denoiser, step, batch)
        kwargs = {"encoder_hidden_states": batch.conditioning.conditioning["prompt_embeds"]}
        if name == "sd3":
            kwargs["pooled_projections"] = batch.conditioning.conditioning["pooled_prompt_embeds"]
        if name == "sdxl":
            kwargs["added_cond_kwargs"] = {
                "text_embeds": batch.conditioning.conditioning["pooled_prompt_embeds"],
                "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)}
        direct = predict_x0(family.denoiser, batch.noise, step, **kwargs)
    torch.testing.assert_close(via_family, direct)
    torch.testing.assert_close(batch.noise[0], cache[0]["noise"])


def test_gradients_reach_only_the_adapter_through_the_frozen_decoder(tmp_path):
    pipe, _, family, data = setup("sd", tmp_path)
    batch = data.batch([0, 1])
    step = one_step_timestep(pipe.scheduler)
    x0 = predict_x0_with_family(family, family.denoiser, step, batch).detach().requires_grad_(True)
    pixels = decode_latents(pipe.vae, x0)
    HiPALoss()(pixels, batch.target)[0].backward()
    assert x0.grad.abs().sum() > 0  # the loss reaches x̂0 through the decoder

    loss, terms, _ = one_step_loss(family, family.denoiser, step, batch, HiPALoss())
    loss.backward()
    assert set(terms) == {"spatial_l2", "fourier", "edge"}
    adapter_params = {id(p) for p in difftune.trainable_parameters(family.denoiser)}
    for module in (family.denoiser, pipe.vae, *family.text_encoders):
        for param in module.parameters():
            if id(param) in adapter_params:
                assert param.grad is not None and torch.isfinite(param.grad).all()
            else:
                assert param.grad is None and not param.requires_grad


def test_batches_are_a_function_of_stream_position(tmp_path):
    _, cache, family, data = setup("sd", tmp_path)
    again = OneStepData(cache, family.encode_prompts, seed=3, device="cpu")
    first, second = data.batch([4, 5]), again.batch([4, 5])
    assert first.indices == second.indices
    torch.testing.assert_close(first.target, second.target)
    epoch = [data.batch([p]).indices[0] for p in range(len(PROMPTS))]
    assert sorted(epoch) == list(range(len(PROMPTS)))  # each sample once per epoch


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_training_lowers_the_loss(name, tmp_path):
    """A few Adam steps lower the HiPA loss of the one-step student against a photograph.

    (Random tiny models' one-step and multi-step samples are already almost equal, so a
    real image stands in for the teacher's sample to give the student something to fit.)
    """
    pipe, _, family, data = setup(name, tmp_path, PROMPTS[:1], rank=8)
    step = one_step_timestep(pipe.scheduler)
    loss_fn = HiPALoss()
    optimizer = torch.optim.Adam(difftune.trainable_parameters(family.denoiser), lr=1e-2)
    batch = data.batch([0])
    batch.target = natural_image(SIZE)
    losses = []
    for _ in range(12):
        loss, _, _ = one_step_loss(family, family.denoiser, step, batch, loss_fn)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0] and losses[-1] == min(losses), losses


def test_bf16_autocast_step_has_finite_gradients(tmp_path):
    """Mixed precision as the trainer runs it on CPU: bf16 autocast, fp32 adapter weights."""
    pipe, _, family, data = setup("sd-v", tmp_path, PROMPTS[:1])
    step = one_step_timestep(pipe.scheduler)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms, _ = one_step_loss(family, family.denoiser, step, data.batch([0]), HiPALoss())
    assert all(torch.isfinite(v) for v in terms.values())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in difftune.trainable_parameters(family.denoiser)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
