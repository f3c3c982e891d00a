"""FLUX.1 on the tiny offline model: targeting presets, the training family against the
pipeline's own sampling step, and the methods' files in diffusers' FluxPipeline."""

import pytest
import torch
from conftest import build, randomize_adapter

import difftune
from difftune.model_factory import load_pipeline, offline_t5_tokenizer, pipeline_family
from difftune.targeting import resolve_targets
from difftune.training.data import TrainingBatch
from difftune.training.families import FluxFamily, LossOptions, training_family

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
    from difftune.training.families import NoisyInput

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
