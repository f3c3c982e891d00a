"""FLUX.2 dev and klein on their tiny offline models: the built-ins, presets, the family's denoiser call
against each pipeline's own first step, latents and noise as diffusers' FLUX.2 scripts make them, the
subject trainer with every method, and HiPA."""

import family_checks as checks
import pytest
import torch
from conftest import build

import difftune
from difftune.families import LossOptions, training_family
from difftune.targeting import resolve_targets

CPU = torch.device("cpu")
FAMILIES = ["flux2", "flux2-klein"]


def patchify(latents):
    """(B, C, H, W) → (B, 4C, H/2, W/2): each 2x2 patch on channels, as FLUX.2's pipelines lay it out."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(patches):
    b, c4, h, w = patches.shape
    return patches.view(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


def batch_norm(vae, patches):
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    return (patches - mean) / torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_flux2_is_the_published_layout_built_offline_and_saved_the_normal_way(name, tmp_path):
    pipe = checks.check_saved_folder_loads_the_normal_way(name, tmp_path)
    expected = {"flux2": ("Flux2Pipeline", "Mistral3ForConditionalGeneration", True),
                "flux2-klein": ("Flux2KleinPipeline", "Qwen3ForCausalLM", False)}[name]
    assert (type(pipe).__name__, type(pipe.text_encoder).__name__,
            pipe.transformer.config.guidance_embeds) == expected
    assert type(pipe.vae).__name__ == "AutoencoderKLFlux2" and pipe.vae.bn.running_var.std() > 0
    embeds = pipe.encode_prompt(prompt=["a red cube", "a blue cube"], max_sequence_length=64)[0]
    assert embeds.shape[1:] == (64, pipe.transformer.config.joint_attention_dim)
    assert (embeds[0] - embeds[1]).abs().max() > 0  # the prompt survives the system message and template


def test_flux2_presets_select_the_documented_layers():
    model = build("flux2").transformer
    joint = {f"transformer_blocks.{i}.attn.{p}" for i in range(2)
             for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                       "to_add_out")}
    single = {f"single_transformer_blocks.{i}.attn.{p}" for i in range(2)
              for p in ("to_qkv_mlp_proj", "to_out")}
    assert set(resolve_targets(model, "attn")) == joint | single
    ff = {f"transformer_blocks.{i}.{f}.linear_{p}" for i in range(2) for f in ("ff", "ff_context")
          for p in ("in", "out")}
    assert set(resolve_targets(model, "attn-ff")) == joint | single | ff
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(resolve_targets(model, "all")) == linears
    # FLUX.1's presets are unchanged by FLUX.2's terms
    flux = build("flux").transformer
    assert not any("to_qkv_mlp_proj" in n or "linear_in" in n for n in resolve_targets(flux, "all"))


def test_flux2_dev_prediction_is_the_pipelines_own_first_step():
    """Dev: patchified 2x2, normalised latents in, packed tokens out, the guidance embedding's value."""
    def from_pipeline(tokens, pipe):
        b, _, c = tokens.shape
        return unpatchify(tokens.permute(0, 2, 1).reshape(b, c, 16, 16))

    checks.check_first_step("flux2", LossOptions(guidance_scale=2.5, max_sequence_length=16), patchify,
                     from_pipeline, guidance_scale=2.5, max_sequence_length=16)


def test_flux2_klein_prediction_is_the_pipelines_own_first_step():
    """klein without CFG (guidance 1): its latent output is the VAE's own, denormalised."""
    def from_pipeline(raw, pipe):
        return unpatchify(batch_norm(pipe.vae, patchify(raw)))

    checks.check_first_step("flux2-klein", LossOptions(max_sequence_length=16), patchify, from_pipeline,
                     guidance_scale=1.0, max_sequence_length=16)


@pytest.mark.parametrize("name", FAMILIES)
def test_flux2_latents_noise_and_timesteps_follow_diffusers_flux2_scripts(name):
    """The posterior's mode, patchified and batch-normalised; uniform timesteps, unit weights, unshifted
    sigmas (the scheduler shifts dynamically, for sampling only); the guidance default of dev's script."""
    pipe = build(name)
    family = training_family(pipe, CPU, LossOptions())
    assert family.weighting_scheme == "none" and family.options.max_sequence_length == 512
    assert family.options.guidance_scale == (3.5 if name == "flux2" else None)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mode = pipe.vae.encode(pixels).latent_dist.mode()
    latents = family.latents_from_moments(family.encode_images(pixels), checks.generators(2))
    expected = unpatchify(batch_norm(pipe.vae, patchify(mode)))
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    noise = torch.randn_like(latents)
    noisy = family.add_noise(latents, noise, checks.generators(2))
    index = torch.cat([(torch.rand((1,), generator=g) * 1000).long() for g in checks.generators(2)])
    sigma = (1 - index / 1000).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy.sigmas, sigma)
    torch.testing.assert_close(noisy.weights, torch.ones(2))
    torch.testing.assert_close(noisy.target, noise - latents)


def test_sara_on_a_bf16_flux2_base_keeps_gradients_only_of_its_entries():
    checks.check_sara_on_a_bf16_base("flux2")


# --- the subject trainer ------------------------------------------------------------------------

def test_flux2_trainer_passes_guidance_text_length_and_position_ids(train_subject, subject_dir, tmp_path,
                                                                    monkeypatch):
    """What diffusers' FLUX.2 script passes: the guidance value, --max_sequence_length prompt tokens with
    their 4-axis ids, one token per 2x2 patch; the LoRA copy loads in Flux2Pipeline with the same images;
    the ComfyUI and diff exports are written."""
    from safetensors.torch import load_file

    training, out, _ = checks.train_with_everything(
        train_subject, subject_dir, tmp_path, monkeypatch, "flux2", "--guidance_scale", 2.0,
        "--max_sequence_length", 24, "--weighting_scheme", "logit_normal", "--learning_rate", 1e-2,
        "--export", "comfyui", "diff")
    for kwargs in training:
        assert kwargs["guidance"].tolist() == [2.0, 2.0]
        assert kwargs["encoder_hidden_states"].shape[:2] == (2, 24) and kwargs["txt_ids"].shape == (2, 24, 4)
        assert kwargs["hidden_states"].shape == (2, 8 * 8, 16) and kwargs["img_ids"].shape == (2, 64, 4)
    checks.check_lora_copy_loads_in_diffusers("flux2", out)
    comfyui = load_file(out / "adapter_comfyui.safetensors")
    assert comfyui and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                           for k in comfyui)
    assert load_file(out / "adapter_diff.safetensors")


def test_flux2_klein_trainer_gets_no_guidance_embedding(train_subject, subject_dir, tmp_path, monkeypatch):
    """No guidance value; --free_text_encoder drops the Qwen3 once the prompts are encoded, and the
    validation samples (CFG: an encoded empty negative prompt) need none. (Prior preservation is the dev
    model's test: the same code path.)"""
    training, out, pipe = checks.train_with_everything(
        train_subject, subject_dir, tmp_path, monkeypatch, "flux2-klein", "--max_sequence_length", 16,
        "--learning_rate", 1e-2, "--free_text_encoder", prior=False)
    assert pipe.text_encoder is None
    assert all(kwargs["guidance"] is None and kwargs["encoder_hidden_states"].shape[:2] == (1, 16)
               for kwargs in training)
    checks.check_lora_copy_loads_in_diffusers("flux2-klein", out)


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
@pytest.mark.parametrize("name", FAMILIES)
def test_flux2_resumes_bit_identically(train_subject, subject_dir, tmp_path, name, method):
    checks.check_resume_is_bit_identical(
        train_subject, subject_dir, tmp_path, name, method,
                                  "--max_sequence_length", 16)


BAD_INPUT = {
    "guidance on klein": ("flux2-klein", ["--guidance_scale", "3"],
                          "--guidance_scale only apply to Flux and FLUX.2;"),
    "t5 length": ("flux2", ["--max_sequence_length", "600"], r"--max_sequence_length must be in \[1, 512\]"),
    "snr": ("flux2", ["--snr_gamma", "5"], "--snr_gamma only apply to SD 1.x/2.x and SDXL"),
    "resolution": ("flux2", ["--resolution", "66"],
                   "--resolution must be a multiple of 4 for builtin:tiny-flux2"),
    "text encoder": ("flux2-klein", ["--train_text_encoder"],
                     "--train_text_encoder supports SD 1.x/2.x and SDXL"),
    "kohya": ("flux2", ["--export", "kohya"], "--format kohya on a FLUX.2 model .*use --format comfyui"),
    "offload without a GPU": ("flux2", ["--offload"], "--offload moves the VAE and text encoders between CPU "
                              "and GPU memory; there is no CUDA GPU here"),
    "free a trained encoder": ("flux2", ["--free_text_encoder", "--no-pre_compute_text_embeddings"],
                               "--free_text_encoder drops the text encoders once the prompts are encoded"),
    "quantized encoder bits": (
        "flux2", ["--quantize_text_encoder", "4bit", "--quantize_base", "8bit"],
        "--quantize_text_encoder 4bit and --quantize_base 8bit: give both the same value"),
    "quantized encoder trained": (
        "flux2-klein", ["--quantize_text_encoder", "8bit", "--train_token_embedding"],
        "--quantize_text_encoder 8bit cannot be used with --train_token_embedding"),
    "unnamed module": ("flux2", ["--targets", "all", "--export", "comfyui"],
                       "--format comfyui on a FLUX.2 model .*ComfyUI has no name for the transformer module "
                       "'time_guidance_embed"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_flux2_bad_input_is_refused_before_loading(train_subject, subject_dir, tmp_path, monkeypatch, case):
    name, argv, message = BAD_INPUT[case]
    checks.check_refused_before_loading(
        train_subject, subject_dir, tmp_path, monkeypatch, name, argv, message)


@pytest.mark.parametrize("name", FAMILIES)
def test_hipa_on_flux2_trains_the_one_step_the_pipeline_samples(name, tmp_path):
    checks.check_hipa_one_step(name, tmp_path, guidance_scale=1.0 if name == "flux2-klein" else 3.5)
