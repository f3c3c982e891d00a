"""The layer-wrapping methods on a PixArt DiT (the tiny pipelines cover SD 1.x, SDXL, SD3):
attach keeps the output, merge equals the unmerged forward, remove restores the model."""

import pytest
import torch
from conftest import randomize_adapter

import difftune


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, in_channels=4, out_channels=8,
                                    cross_attention_dim=16, caption_channels=24, norm_num_groups=None)


def run(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 4, 8, 8, generator=gen),
                     encoder_hidden_states=torch.randn(2, 5, 24, generator=gen),
                     timestep=torch.tensor([10, 500]),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


@pytest.mark.parametrize(("method", "options"), [("svfit", {}), ("tlora", {}),
                                                 ("tlora", {"residual": "lora", "transform_rank": 1})])
@pytest.mark.parametrize("targets", ["attn", "all"])  # "all" includes the strided patch-embedding conv
def test_pixart(method, options, targets):
    model = tiny_pixart()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = run(model)
    difftune.add_adapter(model, method, targets=targets, **options)
    torch.testing.assert_close(run(model), base, atol=1e-6, rtol=0)
    randomize_adapter(model, std=0.1)
    adapted = run(model)
    assert (adapted - base).abs().max() > 1e-3
    difftune.merge_adapter(model, unload=False)
    torch.testing.assert_close(run(model), adapted, atol=1e-5, rtol=1e-4)
    difftune.unmerge_adapter(model)
    difftune.remove_adapter(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


# --- the PixArt family: the tiny built-in, its denoiser call, the trainer ---------------------------

def test_tiny_pixart_is_a_pixart_alpha_pipeline_and_its_relatives_are_refused_by_name():
    from difftune.families import family_of_class, pipeline_family
    from difftune.model_factory import describe_model, load_pipeline

    pipe = load_pipeline("builtin:tiny-pixart")
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and pipeline_family(pipe) == "pixart"
    assert pipe.transformer.config.out_channels == 2 * pipe.transformer.config.in_channels  # learned variance
    info = describe_model("builtin:tiny-pixart")
    assert info.resolution == 256 == pipe.transformer.config.sample_size * pipe.vae_scale_factor
    assert info.size_multiple == pipe.vae_scale_factor * pipe.transformer.config.patch_size
    assert family_of_class("PixArtSigmaPipeline").name == "pixart"
    with pytest.raises(difftune.DifftuneError, match="PixArtSigmaPAGPipeline .*perturbed-attention guidance"):
        family_of_class("PixArtSigmaPAGPipeline")


def test_pixart_family_gives_the_x0_the_pipeline_samples_in_one_step():
    """One step from pure noise: the family's conditioning (T5 embeddings and their mask, micro-conditions)
    and its learned-variance split must give the x̂0 the pipeline itself computes."""
    from conftest import build

    from difftune.families import LossOptions, TrainingBatch, training_family
    from difftune.hipa.one_step import generate_one_step, one_step_timestep
    from difftune.hipa.training import OneStepBatch, predict_x0_with_family

    pipe = build("pixart")
    family = training_family(pipe, torch.device("cpu"), LossOptions())
    noise = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        conditioning = TrainingBatch(None, family.encode_prompts(["a red circle"]), None, None, None, [])
        ours = predict_x0_with_family(family, pipe.transformer, one_step_timestep(pipe.scheduler),
                                      OneStepBatch(noise, None, conditioning, [0]))
        theirs = generate_one_step(pipe, "a red circle", height=256, width=256, latents=noise,
                                   output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_pixart_trains_with_the_subject_trainer_and_its_file_reloads(train_subject, subject_dir, tmp_path):
    from conftest import build, generate

    out = tmp_path / "out"
    flags = ["--pretrained_model_name_or_path", "builtin:tiny-pixart", "--instance_data_dir", subject_dir,
             "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--max_train_steps", 2,
             "--report_to", "none", "--seed", 0, "--skip_final_inference", "--learning_rate", 1e-2]
    train_subject(*flags, "--snr_gamma", 5.0, "--export", "diffusers")
    info = difftune.read_adapter_info(out / "adapter.safetensors")
    assert info["component"] == "transformer" and info["fingerprint"]["class"] == "PixArtTransformer2DModel"
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # no diffusers LoRA loader for PixArt
    fresh = build("pixart")
    difftune.load_adapter(fresh, out / "adapter.safetensors")
    tuned = generate(fresh)
    assert abs(tuned - generate(build("pixart"))).max() > 1e-4
    from diffusers import DiffusionPipeline

    merged = DiffusionPipeline.from_pretrained(out / "merged_diffusers")
    merged.set_progress_bar_config(disable=True)
    assert abs(generate(merged) - tuned).max() < 1e-4
