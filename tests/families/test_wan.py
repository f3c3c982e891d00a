"""Wan 2.1 / 2.2 on the tiny offline models: the built-ins, the training family against WanPipeline's own
sampling step and latent statistics, the experts' noise ranges, target presets and parameter counts of the
real configs (meta device, closed forms), and the ComfyUI key layout against diffusers' own conversion."""

import numpy as np
import pytest
import torch
from conftest import build, generate, randomize_adapter
from conftest import example_generators as generators

import difftune
from difftune.errors import DifftuneError
from difftune.families import LossOptions, NoisyInput, TrainingBatch, training_family
from difftune.families.wan import (
    WAN21_1_3B_TRANSFORMER_CONFIG,
    WAN21_14B_TRANSFORMER_CONFIG,
    original_module_path,
)
from difftune.model_factory import build_denoiser_on_meta, describe_model, load_pipeline
from difftune.targeting import resolve_targets

CPU = torch.device("cpu")


def batch_of(family, prompts):
    return TrainingBatch(None, family.encode_prompts(prompts), None, None, None, [])


@pytest.fixture(scope="module")
def wan22():
    return load_pipeline("builtin:tiny-wan22")


def test_tiny_wan_builtins_are_wan_pipelines_built_offline(wan22, tmp_path):
    pipe = load_pipeline("builtin:tiny-wan")
    assert type(pipe).__name__ == type(wan22).__name__ == "WanPipeline"
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    assert type(wan22.transformer_2).__name__ == "WanTransformer3DModel"
    assert wan22.config.boundary_ratio == 0.875
    assert type(pipe.text_encoder).__name__ == "UMT5EncoderModel" and len(pipe.tokenizer) > 2
    ids = pipe.tokenizer("a photo of sks dog").input_ids
    assert len(set(ids)) > 5 and pipe.tokenizer.unk_token_id not in ids
    assert describe_model("builtin:tiny-wan").experts == ()
    assert describe_model("builtin:tiny-wan22").experts == ("transformer", "transformer_2")
    # the folder reloads the normal way, both experts and the boundary included, and samples the same
    wan22.save_pretrained(tmp_path / "wan22")
    reloaded = load_pipeline(str(tmp_path / "wan22"))
    assert reloaded.config.boundary_ratio == 0.875
    assert describe_model(str(tmp_path / "wan22")).experts == ("transformer", "transformer_2")
    assert np.abs(generate(reloaded) - generate(wan22)).max() < 1e-6
    assert generate(wan22).shape == (1, 5, 64, 64, 3)  # frames of a clip


def test_family_prediction_is_the_pipelines_own_first_step():
    """One UniPC step from σ_max is x − σ·v̂ (the data prediction of a flow model): the family's prompt
    embeddings, timestep and denoiser call must give the velocity WanPipeline uses."""
    pipe = build("wan")
    family = training_family(pipe, CPU, LossOptions(max_sequence_length=16))
    noise = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    pipe.scheduler.set_timesteps(1)
    timestep, sigma = pipe.scheduler.timesteps[0], pipe.scheduler.sigmas[0]
    with torch.no_grad():
        noisy = NoisyInput(noise, timestep.expand(2), noise, torch.ones(2))
        velocity = family.predict(pipe.transformer, noisy, batch_of(family, ["a sks dog", "a red cube"]))
        stepped = pipe(prompt=["a sks dog", "a red cube"], latents=noise, num_inference_steps=1,
                       guidance_scale=1.0, max_sequence_length=16, height=32, width=32, num_frames=5,
                       output_type="latent").frames
    torch.testing.assert_close(noise - sigma * velocity, stepped, atol=1e-5, rtol=1e-5)


def test_training_draws_from_the_samplers_shifted_table_and_flow_shift_overrides_it():
    pipe = build("wan")
    assert pipe.scheduler.config.flow_shift == 3.0
    for shift in (None, 5.0):
        family = training_family(pipe, CPU, LossOptions(flow_shift=shift))
        s = shift or 3.0
        u = torch.linspace(1, 1 / 1000, 1000)
        torch.testing.assert_close(family.scheduler.sigmas, s * u / (1 + (s - 1) * u))
        torch.testing.assert_close(family.scheduler.timesteps, 1000 * family.scheduler.sigmas)
        assert family.weighting_scheme == "none" and family.options.max_sequence_length == 512
        latents, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
        noisy = family.add_noise(latents, noise, generators(3))
        index = torch.cat([(torch.rand((1,), generator=g) * 1000).long() for g in generators(3)])
        sigma = family.scheduler.sigmas[index].view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(noisy.model_input, (1 - sigma) * latents + sigma * noise)
        torch.testing.assert_close(noisy.target, noise - latents)


def test_experts_train_on_their_own_noise_range(wan22):
    boundary = 0.875 * 1000
    latents, noise = torch.randn(64, 4, 1, 2, 2), torch.randn(64, 4, 1, 2, 2)
    high = training_family(wan22, CPU, LossOptions(expert="high"))
    low = training_family(wan22, CPU, LossOptions(expert="low"))
    assert high.denoiser is wan22.transformer and low.denoiser is wan22.transformer_2
    assert (high.add_noise(latents, noise, generators(64)).timesteps >= boundary).all()
    assert (low.add_noise(latents, noise, generators(64)).timesteps < boundary).all()
    # under --expert both each example goes to the expert of its timestep, as the pipeline samples it
    both = training_family(wan22, CPU, LossOptions(expert="both"))
    assert list(both.trained_denoisers()) == ["transformer", "transformer_2"]
    noisy = NoisyInput(noise[:4], torch.tensor([990.0, 100.0, 900.0, 500.0]), noise[:4], torch.ones(4))
    batch = batch_of(both, ["a", "b", "c", "d"])
    with torch.no_grad():
        routed = both.predict(wan22.transformer, noisy, batch)
        each = [model(hidden_states=noise[:4], timestep=noisy.timesteps,
                      encoder_hidden_states=batch.conditioning["prompt_embeds"], return_dict=False)[0]
                for model in (wan22.transformer, wan22.transformer_2)]
    torch.testing.assert_close(routed, torch.where(
        (noisy.timesteps >= boundary).view(-1, 1, 1, 1, 1), each[0], each[1]))
    with pytest.raises(DifftuneError, match="--expert low: this Wan model has one transformer"):
        training_family(build("wan"), CPU, LossOptions(expert="low"))


def test_both_experts_get_gradients_through_the_routed_step(wan22):
    pipe = load_pipeline("builtin:tiny-wan22")
    family = training_family(pipe, CPU, LossOptions(expert="both"))
    for module in family.trained_denoisers().values():
        difftune.add_adapter(module, "lora", targets="attn", rank=2)
        randomize_adapter(module)
    latents = torch.randn(2, 4, 2, 4, 4)
    noisy = NoisyInput(latents, torch.tensor([950.0, 200.0]), latents, torch.ones(2))
    family.per_example_loss(family.predict(pipe.transformer, noisy, batch_of(family, ["a", "b"])),
                            noisy).mean().backward()
    for module in family.trained_denoisers().values():
        params = difftune.trainable_parameters(module)
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def names(model, targets):
    return set(resolve_targets(model, targets))


def test_wan_presets_select_self_and_cross_attention_and_the_feed_forward():
    model = build("wan").transformer
    attention = {f"blocks.{i}.{a}.{p}" for i in range(2) for a in ("attn1", "attn2")
                 for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert names(model, "attn") == attention
    ffn = {f"blocks.{i}.ffn.net.{p}" for i in range(2) for p in ("0.proj", "2")}
    assert names(model, "attn-ff") == attention | ffn
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names(model, "all") == linears and "proj_out" in linears and "patch_embedding" not in linears


def wan_closed_forms(config):
    """Parameters of a WanTransformer3DModel from its config, and of its attn / attn-ff layers: d = heads
    x head size, L blocks of self- and cross-attention (4 d x d projections with bias and q/k RMS norms
    each), an affine cross-attention norm, a d -> f -> d feed-forward and a 6 x d modulation table."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers, f, text, freq = config["num_layers"], config["ffn_dim"], config["text_dim"], config["freq_dim"]
    c_in, c_out, patch = config["in_channels"], config["out_channels"], 1 * 2 * 2
    block = 2 * (4 * (d * d + d) + 2 * d) + 2 * d + (d * f + f + f * d + d) + 6 * d
    embedders = (freq * d + d + d * d + d) + (d * 6 * d + 6 * d) + (text * d + d + d * d + d)
    total = (c_in * patch * d + d) + embedders + layers * block + (d * c_out * patch + c_out * patch) + 2 * d
    attention = (8 * layers, 8 * layers * d * d)
    return {"total": total, "d": d, "f": f, "L": layers, "attn": attention,
            "attn-ff": (attention[0] + 2 * layers, attention[1] + 2 * layers * d * f)}


@pytest.mark.parametrize(("config", "weights"), [(WAN21_1_3B_TRANSFORMER_CONFIG, 1_418_996_800),
                                                  (WAN21_14B_TRANSFORMER_CONFIG, 14_288_491_584)])
def test_real_configs_on_the_meta_device_match_closed_forms(config, weights):
    """Weights of the real transformers (Wan 2.2 A14B: two experts of the 14B layout) and the layers and
    weights each preset takes, against closed forms in d, f and L."""
    model = build_denoiser_on_meta(config, "WanTransformer3DModel")
    form = wan_closed_forms(config)
    assert sum(p.numel() for p in model.parameters()) == form["total"] == weights
    for preset in ("attn", "attn-ff"):
        chosen = resolve_targets(model, preset)
        count, weight_count = form[preset]
        assert len(chosen) == count and sum(m.weight.numel() for m in chosen.values()) == weight_count


def test_each_methods_trainable_count_on_wan_1_3b_matches_closed_forms():
    """The rows `python -m difftune.params --model wan2.1-1.3b-config` prints (the docs' numbers)."""
    from difftune.params import FLUX_ROWS, REFERENCE_ROWS, parameter_table
    from difftune.tuners.tlora.functional import factorize

    assert REFERENCE_ROWS["wan2.1-1.3b-config"] is REFERENCE_ROWS["wan2.2-a14b-expert-config"] is FLUX_ROWS
    model = build_denoiser_on_meta(WAN21_1_3B_TRANSFORMER_CONFIG, "WanTransformer3DModel")
    form = wan_closed_forms(WAN21_1_3B_TRANSFORMER_CONFIG)
    d, f, layers = form["d"], form["f"], form["L"]
    lora, sara, svfit, tlora = FLUX_ROWS[1:]
    budget = sara[2]["budget"]
    tables = {}
    for preset, rows in (("attn", [lora, sara, svfit, tlora]), ("attn-ff", [lora, sara, svfit])):
        ffn = preset == "attn-ff"
        counts = tables[preset] = {row.method: row for row in parameter_table(model, rows, preset)}
        assert all(row.layers == form[preset][0] for row in counts.values())
        # LoRA r=16: r·(in + out) per layer; SaRA: the budget's share of the weights; SVFit: min(in, out)
        assert counts["lora"].trainable == 16 * layers * 16 * d + ffn * 2 * layers * 16 * (d + f)
        assert counts["sara"].trainable == round(budget * form[preset][1])
        assert counts["svfit"].trainable == 8 * layers * d + ffn * 2 * layers * min(d, f)
    # TLoRA TRM R=2 + TR R=6 on d x d projections: R²·Σ I_k² transform cores, R²·(Σ O_k + Σ I_k) ring cores
    sides = factorize(d)
    assert tables["attn"]["tlora"].trainable == 8 * layers * (4 * sum(s * s for s in sides)
                                                              + 36 * 2 * sum(sides))


def test_comfyui_names_are_the_original_wan_names_diffusers_converts_back():
    """Every Linear of the transformer under its original Wan name (what ComfyUI's Wan model and the
    official checkpoints use): diffusers' own single-file conversion maps those names back exactly."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = build("wan").transformer
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    original = {f"{original_module_path('transformer', n)}.weight": model.get_submodule(n).weight
                for n in linears}
    assert original_module_path("transformer", "blocks.1.attn2.to_out.0") == "blocks.1.cross_attn.o"
    assert original_module_path("transformer", "blocks.0.ffn.net.0.proj") == "blocks.0.ffn.0"
    converted = convert_wan_transformer_to_diffusers(dict(original))
    assert set(converted) == {f"{n}.weight" for n in linears}
    with pytest.raises(DifftuneError, match="no name in the original Wan layout"):
        original_module_path("transformer", "rope")
