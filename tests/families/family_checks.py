"""Checks every family test file runs on its own model: the family's denoiser call against the pipeline's
first sampling step, SaRA's gradients over a bf16 base, a subject-trainer run with what diffusers' scripts
pass, bit-exact resume, bad input refused before loading, and HiPA's one step against the pipeline's."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import build, generate
from safetensors.torch import load_file

import difftune
import difftune.model_factory
from difftune.families import FAMILIES, LossOptions, NoisyInput, TrainingBatch, training_family
from difftune.training import checkpointing

CPU = torch.device("cpu")
PROMPTS = ["a sks dog", "a red cube"]


def generators(count: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]


def conditioning_batch(family, prompts=PROMPTS) -> TrainingBatch:
    size = torch.tensor([[64, 64]] * len(prompts))
    return TrainingBatch(None, family.encode_prompts(list(prompts)), size, torch.zeros_like(size), None, [])


def check_first_step(name: str, options: LossOptions, to_pipeline: Callable, from_pipeline: Callable,
                     **call) -> None:
    """One sampler step from σ = 1 is x1 − v̂: the family's packing, position ids, timestep units and
    conditioning must give the velocity the pipeline itself uses. ``to_pipeline`` / ``from_pipeline``
    are the pipeline's latent layout written out by the caller (independently of the family)."""
    from difftune.hipa.one_step import one_step_scheduler

    pipe = build(name)
    pipe.scheduler = one_step_scheduler(pipe.scheduler)  # (Qwen-Image's terminal stretch needs 2+ steps)
    family = training_family(pipe, CPU, options)
    noise = torch.randn(len(PROMPTS), family.latent_channels(family.denoiser.config), 32, 32,
                        generator=torch.Generator().manual_seed(3))
    noisy = NoisyInput(noise, torch.full((len(PROMPTS),), 1000.0), noise, torch.ones(len(PROMPTS)))
    with torch.no_grad():
        ours = family.predict(pipe.transformer, noisy, conditioning_batch(family))
        stepped = pipe(prompt=PROMPTS, latents=to_pipeline(noise), num_inference_steps=1, height=64, width=64,
                       output_type="latent", **call).images
    torch.testing.assert_close(noise - ours, from_pipeline(stepped, pipe), atol=1e-5, rtol=1e-5)


def check_sara_on_a_bf16_base(name: str) -> None:
    """fp32 1-D trained values over bf16 base weights: nnz-sized gradients, no dense weight gradient,
    and after a step every selected weight is bf16(W0 + Δ) and nothing else moved."""
    pipe = build(name)
    model = difftune.find_denoiser(pipe)[0].to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    family = training_family(pipe, CPU, LossOptions())
    adapter = difftune.add_adapter(pipe, "sara", targets="all", budget=0.05)
    params = difftune.trainable_parameters(pipe)
    assert all(p.dtype == torch.float32 and p.dim() == 1 for p in params)
    latents = torch.randn(1, family.latent_channels(model.config), 8, 8, dtype=torch.bfloat16)
    noisy = family.add_noise(latents, torch.randn_like(latents), generators(1))
    batch = conditioning_batch(family, PROMPTS[:1])
    batch.conditioning = {k: v.bfloat16() if v.is_floating_point() else v
                          for k, v in batch.conditioning.items()}
    family.per_example_loss(family.predict(model, noisy, batch), noisy).mean().backward()
    dead = tuple(f"{name}." for name in family.modules_without_gradient(model))
    assert all(p.grad is not None and p.grad.shape == p.shape
               for n, p in difftune.named_trainable_parameters(pipe) if not n.startswith(dead))
    trained = {id(p) for p in params}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trained)
    torch.optim.AdamW(params, lr=1e-2).step()
    difftune.merge_adapter(pipe, unload=False)
    after = model.state_dict()
    changed = 0
    for key, entry in adapter.entries.items():
        index = entry.index.long()
        expected = (before[key].reshape(-1)[index].float() + entry.delta.detach()).bfloat16()
        assert torch.equal(after[key].reshape(-1)[index], expected)
        untouched = torch.ones(after[key].numel(), dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(after[key].reshape(-1)[untouched], before[key].reshape(-1)[untouched])
        changed += int((after[key].reshape(-1)[index] != before[key].reshape(-1)[index]).sum())
    assert changed > 0


def check_saved_folder_loads_the_normal_way(name: str, tmp_path):
    """``builtin:tiny-<name>`` saved with ``save_pretrained`` is an ordinary pipeline folder: load_pipeline
    and describe_model read it, its tokenizer and text encoder came back, it samples the same images.
    Returns the built-in pipeline."""
    from difftune.model_factory import describe_model, load_pipeline

    pipe = load_pipeline(f"builtin:tiny-{name}")
    pipe.save_pretrained(tmp_path / name)
    loaded = load_pipeline(str(tmp_path / name))
    assert type(loaded) is type(pipe) and describe_model(str(tmp_path / name)).family == name
    text = "a photo of sks dog, on grass!"
    assert loaded.tokenizer(text).input_ids == pipe.tokenizer(text).input_ids
    assert len(set(pipe.tokenizer(text).input_ids)) > 10 and len(pipe.tokenizer) > 256
    assert np.abs(generate(loaded) - generate(pipe)).max() < 1e-5
    return pipe


# --- the subject trainer ------------------------------------------------------------------------

def subject_flags(name: str, subject_dir, out, *extra) -> list:
    return ["--pretrained_model_name_or_path", f"builtin:tiny-{name}", "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--report_to", "none",
            "--seed", "0", *extra]


def record_denoiser_calls(monkeypatch) -> tuple[list, list]:
    """The pipelines the trainer loads, and (kwargs, training, grad enabled) of the first one's denoiser
    calls."""
    loaded, calls = [], []
    original = difftune.model_factory.load_pipeline

    def recording(*args, **kwargs):
        pipe = original(*args, **kwargs)
        if not loaded:
            difftune.find_denoiser(pipe)[0].register_forward_pre_hook(
                lambda module, args, kwargs: calls.append((kwargs, module.training,
                                                           torch.is_grad_enabled())), with_kwargs=True)
        loaded.append(pipe)
        return pipe

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", recording)
    return loaded, calls


def train_with_everything(train_subject, subject_dir, tmp_path, monkeypatch, name: str, *extra,
                          prior: bool = True):
    """Two steps with prior preservation (class images generated by the base model; ``prior``), validation
    samples, gradient checkpointing, bf16 base weights with fp32 adapters and the diffusers LoRA copy, at
    32 px (the class images and samples are drawn under bf16 autocast, whose convolutions are slow on a
    CPU); returns the training calls' denoiser kwargs, the output folder and the trained pipeline, after
    the checks every family shares."""
    loaded, calls = record_denoiser_calls(monkeypatch)
    out = tmp_path / name
    with_prior = ["--with_prior_preservation", "--class_data_dir", tmp_path / "class", "--class_prompt",
                  "a photo of disc", "--num_class_images", 2, "--class_inference_steps", 1] if prior else []
    train_subject(*subject_flags(name, subject_dir, out, "--max_train_steps", 2, "--resolution", 32,
                                 "--gradient_checkpointing", "--mixed_precision", "bf16", *with_prior,
                                 "--validation_prompt", "a sks disc",
                                 "--validation_steps", 2, "--num_validation_images", 1,
                                 "--validation_inference_steps", 1, "--skip_final_inference", *extra))
    training = [kwargs for kwargs, is_training, grad in calls if is_training and grad]
    assert len(training) == 2  # one forward per step (with the prior: instance and class image in one batch)
    denoiser = difftune.find_denoiser(loaded[0])[0]
    assert denoiser.is_gradient_checkpointing
    trainable = dict(difftune.named_trainable_parameters(denoiser))
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in denoiser.named_parameters() if n not in trainable)
    assert len(list((tmp_path / "class").glob("*.png"))) == (2 if prior else 0)
    assert (out / "validation" / "step-000002.png").is_file()
    info = difftune.read_adapter_info(out / "adapter.safetensors")
    assert info["fingerprint"]["class"] == FAMILIES[name].denoiser_class
    return training, out, loaded[0]


def check_lora_copy_loads_in_diffusers(name: str, out) -> None:
    """The trainer's pytorch_lora_weights.safetensors in the pipeline's own load_lora_weights gives
    difftune.load_adapter's images."""
    ours, theirs = build(name), build(name)
    difftune.load_adapter(ours, out / "adapter.safetensors")
    theirs.load_lora_weights(str(out))
    images = generate(ours)
    assert np.abs(generate(theirs) - images).max() < 1e-5
    assert np.abs(generate(build(name)) - images).max() > 1e-4  # the trained adapter changes the images


def check_resume_is_bit_identical(train_subject, subject_dir, tmp_path, name: str, method: str,
                                  *extra) -> None:
    """Two steps straight, against one step, then a fresh process resuming at the first checkpoint:
    the same adapter, optimizer and schedule state, bit for bit (Adam moments, warm-up schedule, random
    crops, flips, noise and timesteps all carry across)."""
    def run(out, *more):
        train_subject(*subject_flags(name, subject_dir, out, "--adapter", method, "--max_train_steps", 2,
                                     "--checkpointing_steps", 1, "--lr_scheduler", "cosine",
                                     "--lr_warmup_steps", 1,
                                     "--learning_rate", 1e-3, "--random_flip", "--resolution", 32,
                                     "--skip_final_inference", *extra, *more))

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(full)
    run(resumed, "--resume_from_checkpoint", full / "checkpoint-1")
    straight, continued = load_file(full / "adapter.safetensors"), load_file(resumed / "adapter.safetensors")
    assert straight.keys() == continued.keys()
    assert all(torch.equal(straight[k], continued[k]) for k in straight)
    first = load_file(full / "checkpoint-1" / "adapter.safetensors")
    assert any(not torch.equal(straight[k], first[k]) for k in straight)  # the second step did change it
    for state in ("optimizer.safetensors", "scheduler.safetensors"):
        assert str(checkpointing.load_state(full / "checkpoint-2" / state)) == str(
            checkpointing.load_state(resumed / "checkpoint-2" / state))


def check_refused_before_loading(train_subject, subject_dir, tmp_path, monkeypatch, name: str, argv: list,
                                 message: str) -> None:
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", must_not_load)
    with pytest.raises(difftune.DifftuneError, match=message):
        train_subject(*subject_flags(name, subject_dir, tmp_path / "o"), *argv)


# --- HiPA -----------------------------------------------------------------------------------------

def check_hipa_one_step(name: str, tmp_path, **teacher) -> None:
    """Teacher samples from the family's pipeline; the student's x̂0 = x1 − v̂ at σ = 1; the loss reaches
    the adapter; and `generate_one_step` (the pipeline with a one-step scheduler) gives the same x̂0."""
    from difftune.hipa.loss import HiPALoss
    from difftune.hipa.one_step import (
        decode_latents,
        from_pipeline_latents,
        generate_one_step,
        one_step_timestep,
    )
    from difftune.hipa.teacher import TeacherSettings, generate_teacher_samples
    from difftune.hipa.training import OneStepData, one_step_loss, predict_x0_with_family

    pipe = build(name)
    cache = generate_teacher_samples(pipe, ["a red circle", "a blue square"], tmp_path / "teacher",
                                     TeacherSettings(num_inference_steps=2, **teacher), height=32, width=32,
                                     show_progress=False)
    family = training_family(pipe, CPU, LossOptions())
    assert cache[0]["noise"].shape == (family.latent_channels(family.denoiser.config), 16, 16)
    step = one_step_timestep(pipe.scheduler)
    assert step.sigma == 1.0
    difftune.add_adapter(pipe, "lora", rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in difftune.trainable_parameters(pipe):
            param.add_(torch.randn_like(param) * 0.05)
    data = OneStepData(cache, family.encode_prompts, seed=0, device="cpu")
    batch = data.batch([0])
    loss, _, pixels = one_step_loss(family, family.denoiser, step, batch, HiPALoss())
    loss.backward()
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(loss)
    dead = tuple(f"{name}." for name in family.modules_without_gradient(family.denoiser))
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in difftune.named_trainable_parameters(pipe) if not n.startswith(dead))
    prompt = cache.entries[batch.indices[0]]["prompt"]
    with torch.no_grad():
        x0 = predict_x0_with_family(family, family.denoiser, step, batch)
        sampled = generate_one_step(pipe, prompt, height=32, width=32, latents=batch.noise,
                                    output_type="latent").images
        torch.testing.assert_close(from_pipeline_latents(pipe, sampled, 32, 32), x0, atol=1e-5, rtol=1e-5)
        assert decode_latents(pipe.vae, x0, type(family)).shape == (1, 3, 32, 32)
