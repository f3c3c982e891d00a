"""FLUX.1 on the tiny offline model: targeting presets, the training family against the
pipeline's own sampling step, and the methods' files in diffusers' FluxPipeline."""

import pytest
import torch
from conftest import build, generate, randomize_adapter

import difftune
import difftune.model_factory
from difftune.families import LossOptions, TrainingBatch, pipeline_family, training_family
from difftune.families.flux import FluxFamily
from difftune.model_factory import load_pipeline, offline_t5_tokenizer
from difftune.targeting import resolve_targets

CPU = torch.device("cpu")


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_tiny_flux_is_a_flux_dev_layout_pipeline_built_offline():
    pipe = load_pipeline("builtin:tiny-flux")
    assert type(pipe).__name__ == "FluxPipeline" and pipeline_family(pipe) == "flux"
    assert pipe.transformer.config.guidance_embeds  # dev, not schnell
    assert len(pipe.tokenizer) > 2 and len(pipe.tokenizer_2) > 2
    ids = pipe.tokenizer_2("a photo of sks dog").input_ids
    assert len(set(ids)) > 5 and pipe.tokenizer_2.unk_token_id not in ids
    assert pipe.tokenizer_2("a red cube").input_ids != pipe.tokenizer_2("a blue cube").input_ids


def test_a_saved_flux_folder_loads_the_normal_way_and_samples_the_same(tmp_path):
    import numpy as np
    from conftest import generate

    pipe = build("flux")
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_pipeline(str(tmp_path / "flux"))
    assert type(loaded).__name__ == "FluxPipeline"
    assert np.abs(generate(loaded) - generate(pipe)).max() < 1e-5


def test_offline_t5_tokenizer_round_trips(tmp_path):
    tokenizer = offline_t5_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded("a sks dog, on grass!").input_ids == tokenizer("a sks dog, on grass!").input_ids


def names(model, targets):
    return set(resolve_targets(model, targets))


def test_flux_presets_select_the_documented_layers():
    model = build("flux").transformer
    joint = {f"transformer_blocks.{i}.attn.{p}" for i in range(2)
             for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                       "to_add_out")}
    single = {f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v")}
    assert names(model, "attn") == joint | single
    ff = {f"transformer_blocks.{i}.{f}.net.{p}" for i in range(2) for f in ("ff", "ff_context")
          for p in ("0.proj", "2")}
    mlp = {f"single_transformer_blocks.{i}.{p}" for i in range(2) for p in ("proj_mlp", "proj_out")}
    assert names(model, "attn-ff") == joint | single | ff | mlp
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names(model, "all") == linears
    assert "proj_out" not in names(model, "attn-ff")  # the final projection is not the single blocks' MLP


def test_flux_family_predict_is_the_pipelines_own_first_step():
    """One sampler step from σ = 1 is x1 − v̂: the family's packing, ids, timestep scale and
    guidance embedding must give the velocity the pipeline itself uses."""
    pipe = build("flux")
    family = training_family(pipe, CPU, LossOptions(guidance_scale=2.5, max_sequence_length=16))
    assert isinstance(family, FluxFamily)
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        conditioning = family.encode_prompts(["a sks dog", "a red cube"])
        ours = family.predict(pipe.transformer, family_noisy(noise), TrainingBatch(None, conditioning, None,
                                                                                  None, None, []))
        packed = noise.view(2, 4, 16, 2, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 256, 16)
        stepped = pipe(prompt=["a sks dog", "a red cube"], latents=packed, num_inference_steps=1,
                       guidance_scale=2.5, max_sequence_length=16, height=64, width=64,
                       output_type="latent").images
    unpacked = stepped.view(2, 16, 16, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 32, 32)
    torch.testing.assert_close(noise - ours, unpacked, atol=1e-5, rtol=1e-5)


def family_noisy(noise):
    from difftune.families import NoisyInput

    return NoisyInput(noise, torch.full((noise.shape[0],), 1000.0), noise, torch.ones(noise.shape[0]))


def test_flux_training_defaults_follow_diffusers_flux_script():
    """Uniform timesteps and unit weights ('none'), sigmas unshifted (dynamic shifting is for sampling)."""
    pipe = build("flux")
    family = training_family(pipe, CPU, LossOptions())
    assert family.weighting_scheme == "none" and family.options.guidance_scale == 3.5
    assert family.options.max_sequence_length == 512
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy = family.add_noise(latents, noise, generators(3))
    index = torch.cat([(torch.rand((1,), generator=g) * 1000).long() for g in generators(3)])
    sigma = (1 - index / 1000).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy.sigmas, sigma)
    torch.testing.assert_close(noisy.weights, torch.ones(3))
    torch.testing.assert_close(noisy.model_input, (1 - sigma) * latents + sigma * noise)
    # SD3 keeps its own default
    assert training_family(build("sd3"), CPU, LossOptions()).weighting_scheme == "logit_normal"


def test_schnell_layout_gets_no_guidance_embedding():
    pipe = build("flux")
    from diffusers import FluxTransformer2DModel

    config = {**pipe.transformer.config, "guidance_embeds": False}
    pipe.transformer = FluxTransformer2DModel.from_config(config)
    family = training_family(pipe, CPU, LossOptions())
    noisy = family_noisy(torch.randn(1, 4, 8, 8))
    kwargs = family.model_kwargs(noisy, TrainingBatch(None, family.encode_prompts(["a dog"]), None, None,
                                                      None, []))
    assert kwargs["guidance"] is None
    assert family.predict(pipe.transformer, noisy, TrainingBatch(
        None, family.encode_prompts(["a dog"]), None, None, None, [])).shape == (1, 4, 8, 8)


@pytest.mark.parametrize("method", ["sara", "svfit", "tlora", "lora"])
def test_gradients_reach_every_trainable_tensor_on_flux(method):
    pipe = build("flux")
    family = training_family(pipe, CPU, LossOptions())
    options = {"budget": 0.05} if method == "sara" else {}
    difftune.add_adapter(pipe, method, targets="attn-ff", **options)
    randomize_adapter(pipe, std=0.1)  # zero-initialised factors (LoRA B, TR's first core) pass no gradient
    latents = torch.randn(1, 4, 8, 8)
    noisy = family.add_noise(latents, torch.randn_like(latents), generators(1))
    batch = TrainingBatch(None, family.encode_prompts(["a sks dog"]), None, None, None, [])
    family.per_example_loss(family.predict(pipe.transformer, noisy, batch), noisy).mean().backward()
    params = difftune.trainable_parameters(pipe)
    assert params
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_sara_unstructured_backprop_with_bf16_flux_weights():
    from family_checks import check_sara_on_a_bf16_base

    check_sara_on_a_bf16_base("flux")


# --- the subject trainer on Flux --------------------------------------------------------------

def subject_flags(subject_dir, out, *extra):
    return ["--pretrained_model_name_or_path", "builtin:tiny-flux", "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--report_to", "none",
            "--seed", "0", *extra]


def test_flux_trainer_uses_guidance_t5_length_prior_and_validation(train_subject, subject_dir, tmp_path,
                                                                  monkeypatch):
    """What diffusers' Flux DreamBooth script passes: the guidance value, T5 prompts of
    --max_sequence_length tokens, packed latents; plus class images generated with the base model,
    validation samples, gradient checkpointing and bf16 base weights with fp32 adapters."""
    loaded, calls = [], []
    original = difftune.model_factory.load_pipeline

    def recording(*args, **kwargs):
        pipe = original(*args, **kwargs)
        if not loaded:
            pipe.transformer.register_forward_pre_hook(
                lambda module, args, kwargs: calls.append(
                    (kwargs["guidance"], kwargs["encoder_hidden_states"].shape, module.training,
                     torch.is_grad_enabled())), with_kwargs=True)
        loaded.append(pipe)
        return pipe

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", recording)
    out = tmp_path / "flux"
    train_subject(*subject_flags(subject_dir, out, "--max_train_steps", 2, "--guidance_scale", 2.0,
                                 "--max_sequence_length", 24, "--weighting_scheme", "logit_normal",
                                 "--gradient_checkpointing", "--mixed_precision", "bf16",
                                 "--with_prior_preservation", "--class_data_dir", tmp_path / "class",
                                 "--class_prompt", "a photo of disc", "--num_class_images", 2,
                                 "--class_inference_steps", 1, "--validation_prompt", "a sks disc",
                                 "--validation_steps", 2, "--num_validation_images", 1,
                                 "--validation_inference_steps", 1, "--skip_final_inference"))
    training = [c for c in calls if c[2] and c[3]]
    assert len(training) == 2  # one forward per step: instance and class image in one batch
    for guidance, shape, _, _ in training:
        assert guidance.tolist() == [2.0, 2.0] and shape[:2] == (2, 24)
    transformer = loaded[0].transformer
    assert transformer.is_gradient_checkpointing
    trainable = dict(difftune.named_trainable_parameters(transformer))
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in transformer.named_parameters() if n not in trainable)
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert (out / "validation" / "step-000002.png").is_file()
    info = difftune.read_adapter_info(out / "adapter.safetensors")
    assert info["component"] == "transformer" and info["fingerprint"]["class"] == "FluxTransformer2DModel"
    assert "flux" in (out / "README.md").read_text()



def test_flux_trainer_exports_the_comfyui_and_diff_files_it_promised(train_subject, subject_dir, tmp_path):
    """Finding 1 of issue 30: --export comfyui / diff on Flux was accepted, then failed after training."""
    from safetensors.torch import load_file

    out = tmp_path / "flux"
    train_subject(*subject_flags(subject_dir, out, "--max_train_steps", 1, "--skip_final_inference",
                                 "--export", "comfyui", "diff"))
    comfyui = load_file(out / "adapter_comfyui.safetensors")
    diff = load_file(out / "adapter_diff.safetensors")
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha"))
               for k in comfyui)
    assert diff and all(k.startswith("transformer.") and k.endswith((".diff", ".diff_b")) for k in diff)
    pipe, fresh = build("flux"), build("flux")
    difftune.load_adapter(pipe, out / "adapter.safetensors")
    fresh.load_lora_weights(str(out / "adapter_comfyui.safetensors"))  # diffusers reads the ComfyUI file
    assert abs(generate(fresh) - generate(pipe)).max() < 1e-5

def flux_bad_inputs(tmp_path, subject_dir):
    sd = ["--pretrained_model_name_or_path", "builtin:tiny-sd"]
    return {
        "guidance on sd": ([*sd, "--guidance_scale", "3"], "--guidance_scale only apply to Flux"),
        "t5 length on sd3": (["--pretrained_model_name_or_path", "builtin:tiny-sd3", "--max_sequence_length",
                              "64"], "--max_sequence_length only apply to Flux"),
        "t5 too long": (["--max_sequence_length", "600"], r"--max_sequence_length must be in \[1, 512\]"),
        "snr on flux": (["--snr_gamma", "5"], "--snr_gamma only apply to SD 1.x/2.x and SDXL"),
        "resolution": (["--resolution", "66"], "--resolution must be a multiple of 4 for builtin:tiny-flux"),
        "text encoder": (["--train_text_encoder"], "--train_text_encoder supports SD 1.x/2.x and SDXL"),
        "quantized sara": (["--adapter", "sara", "--quantize_base", "8bit"],
                           "--quantize_base 8bit cannot be used with --adapter sara: SaRA trains the base "
                           "weights themselves"),
        "quantized svfit": (["--adapter", "svfit", "--quantize_base", "4bit"],
                            "svfit needs the dense base weight"),
        "no bitsandbytes": (["--adapter", "lora", "--quantize_base", "4bit"],
                            "--quantize_base 4bit needs bitsandbytes, which is not installed"),
        "no bitsandbytes for the encoders": (["--quantize_text_encoder", "8bit"],
                                             "--quantize_text_encoder 8bit needs bitsandbytes, which is not "
                                             "installed"),
    }


@pytest.mark.parametrize("case", ["guidance on sd", "t5 length on sd3", "t5 too long", "snr on flux",
                                  "resolution", "text encoder", "quantized sara", "quantized svfit",
                                  "no bitsandbytes", "no bitsandbytes for the encoders"])
def test_flux_bad_input_is_refused_before_loading(train_subject, subject_dir, tmp_path, monkeypatch, case):
    import importlib.util

    if case.startswith("no bitsandbytes") and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", must_not_load)
    argv, message = flux_bad_inputs(tmp_path, subject_dir)[case]
    with pytest.raises(difftune.DifftuneError, match=message):
        train_subject(*subject_flags(subject_dir, tmp_path / "o"), *argv)


# --- HiPA (one-step) on Flux ------------------------------------------------------------------

def test_hipa_on_flux_trains_the_one_step_the_pipeline_samples(tmp_path):
    """Teacher samples from the Flux pipeline, the student's x̂0 = x1 − v̂ at σ = 1 with the guidance
    embedding, the loss reaching the adapter, and `generate_one_step` giving the same x̂0."""
    from difftune.hipa.loss import HiPALoss
    from difftune.hipa.one_step import decode_latents, generate_one_step, one_step_timestep
    from difftune.hipa.teacher import TeacherSettings, generate_teacher_samples
    from difftune.hipa.training import OneStepData, one_step_loss, predict_x0_with_family

    pipe = build("flux")
    cache = generate_teacher_samples(pipe, ["a red circle", "a blue square"], tmp_path / "teacher",
                                     TeacherSettings(num_inference_steps=2, guidance_scale=3.5), height=32,
                                     width=32, show_progress=False)
    assert cache[0]["noise"].shape == (4, 16, 16) and cache[0]["image"].shape == (3, 32, 32)
    family = training_family(pipe, CPU, LossOptions())
    step = one_step_timestep(pipe.scheduler)
    assert step.sigma == 1.0 and float(step.timestep) == 1000.0
    difftune.add_adapter(pipe, "lora", rank=4)
    randomize_adapter(pipe, std=0.05)
    data = OneStepData(cache, family.encode_prompts, seed=0, device="cpu")
    batch = data.batch([0])
    loss, _, pixels = one_step_loss(family, family.denoiser, step, batch, HiPALoss())
    loss.backward()
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in difftune.trainable_parameters(pipe))

    prompt = cache.entries[batch.indices[0]]["prompt"]
    with torch.no_grad():
        x0 = predict_x0_with_family(family, family.denoiser, step, batch)
        sampled = generate_one_step(pipe, prompt, height=32, width=32, latents=batch.noise,
                                    output_type="latent").images
    unpacked = type(pipe)._unpack_latents(sampled, 32, 32, pipe.vae_scale_factor)
    torch.testing.assert_close(unpacked, x0, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert decode_latents(pipe.vae, x0).shape == (1, 3, 32, 32)


def test_docs_flux_commands_parse_with_the_trainer(train_subject):
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "flux.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "train_subject.py" in b]
    assert len(blocks) == 2  # one GPU, FSDP
    for block in blocks:
        command = shlex.split(block.replace("\\\n", " "), comments=True)
        args = train_subject.module.parse_args(command[command.index("train_scripts/train_subject.py") + 1:])
        assert args.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
