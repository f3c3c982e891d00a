"""The offline model factory: tokenizer, tiny pipelines, built-in names, save/reload."""

import math

import numpy as np
import pytest
import torch
from conftest import build, generate

from difftune import DifftuneError
from difftune.api import find_denoiser
from difftune.families import FAMILIES, pipeline_family
from difftune.families.sd import SD15_UNET_CONFIG
from difftune.families.tiny import TINY_RESOLUTION
from difftune.model_factory import (
    build_denoiser_on_meta,
    describe_model,
    load_pipeline,
    offline_clip_tokenizer,
)


def test_offline_tokenizer_is_a_real_tokenizer(tmp_path):
    tokenizer = offline_clip_tokenizer(words=("circle", "red"))
    assert len(tokenizer) > 2
    ids = tokenizer("a red circle").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # whole words become single tokens, other text still tokenizes byte by byte
    assert len(ids) == 2 + 3
    assert len(tokenizer("a blue square").input_ids) > 5
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded("a red circle").input_ids == ids


def test_tiny_pipelines_are_deterministic_and_seed_dependent(family):
    a, b = build(family, seed=0), build(family, seed=0)
    for (name, p), (_, q) in zip(find_denoiser(a)[0].named_parameters(),
                                 find_denoiser(b)[0].named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert pipeline_family(a) == family
    assert abs(generate(build(family, seed=1)) - generate(a)).max() > 0


def test_sd_layout_has_conv_projections_and_sdxl_linear():
    sd, sdxl = build("sd"), build("sdxl")
    assert isinstance(sd.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert isinstance(sdxl.unet.down_blocks[1].attentions[0].proj_in, torch.nn.Linear)
    assert sdxl.unet.config.addition_embed_type == "text_time"


def test_builtin_names_and_folder_round_trip(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.save_pretrained(tmp_path / "tiny")
    reloaded = load_pipeline(str(tmp_path / "tiny"))
    reloaded.set_progress_bar_config(disable=True)
    assert abs(generate(reloaded) - generate(pipe)).max() == 0
    with pytest.raises(DifftuneError, match="unknown built-in model 'builtin:nope'"):
        load_pipeline("builtin:nope")


def test_unsupported_family_is_named():
    with pytest.raises(DifftuneError, match="unsupported base model family: object"):
        pipeline_family(object())


def test_sd15_unet_on_meta_device_has_the_real_size():
    unet = build_denoiser_on_meta(SD15_UNET_CONFIG, "UNet2DConditionModel")
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_describe_model_reads_family_resolution_and_denoiser_without_weights(family, tmp_path):
    pipe = build(family)
    denoiser = find_denoiser(pipe)[0]
    folder = tmp_path / family
    pipe.save_pretrained(folder)
    name = f"builtin:{FAMILIES[family].tiny_name()}"
    first = describe_model(name)
    scale = FAMILIES[family].vae_scale_factor(pipe.vae.config)
    for described in (first, describe_model(str(folder))):
        assert described.family == pipeline_family(pipe) == family
        if family == "wan":  # the tiny built-in's 32-latent size; WanPipeline's default height, 8x8 VAE
            assert described.resolution == (32 * scale if described is first else 480)
            assert described.size_multiple == pipe.vae_scale_factor_spatial * denoiser.config.patch_size[-1]
        else:
            if getattr(denoiser.config, "sample_size", None) is None:  # the pipeline default (Flux: 1024 px)
                folder_resolution = FAMILIES[family].default_sample_size * pipe.vae_scale_factor
                assert described.resolution == (TINY_RESOLUTION if described is first else folder_resolution)
            else:
                assert described.resolution == denoiser.config.sample_size * pipe.vae_scale_factor
            # what the pipeline's image processor rounds to (2x2 packed latents), or the denoiser's own
            # patches, and diffusers' SD/SDXL pipelines' own rule (check_inputs: sides % 8)
            patch = getattr(denoiser.config, "patch_size", None) or 1
            pipeline_rule = 8 if family in ("sd", "sdxl") else 1
            multiple = max(pipe.image_processor.config.vae_scale_factor, pipe.vae_scale_factor * patch)
            assert described.size_multiple == math.lcm(multiple, pipeline_rule)
        meta = build_denoiser_on_meta(described.denoiser_config, described.denoiser_class)
        assert {n: p.shape for n, p in meta.named_parameters()} == {
            n: p.shape for n, p in denoiser.named_parameters()}


def test_describe_model_refuses_other_families_and_missing_models(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxFillPipeline", "transformer": []}')
    with pytest.raises(DifftuneError, match="unsupported base model family: FluxFillPipeline"):
        describe_model(str(tmp_path))
    with pytest.raises(DifftuneError, match="cannot read model_index.json of 'no/such-model'"):
        describe_model("no/such-model")


def test_the_shipped_model_runs_with_plain_diffusers_loading_and_no_dtype():
    """The README's and every model card's snippet: from_pretrained without torch_dtype, then sample."""
    from diffusers import StableDiffusionPipeline

    from difftune.model_factory import EMBEDDED_MODEL_DIR, load_pipeline

    plain = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR)
    for pipe in (plain, load_pipeline("builtin:embedded")):
        assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
        images = generate(pipe)
        assert images.shape[0] == 1 and np.isfinite(images).all()


def test_a_saved_fp16_embedded_model_declares_a_float32_text_encoder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from difftune.world.pretrain import declare_float32_text_encoder

    pipe = build("sd")
    pipe.to(torch.float16).save_pretrained(tmp_path, safe_serialization=True)
    declare_float32_text_encoder(tmp_path)
    again = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert again.text_encoder.dtype == again.unet.dtype == torch.float32
    assert np.isfinite(generate(again)).all()


def test_an_unreadable_hub_model_says_the_hub_is_offline(monkeypatch):
    from huggingface_hub import constants

    from difftune.model_factory import describe_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = r"cannot read model_index.json of 'someone/no-such-model': .*\(the Hugging Face hub is offline"
    with pytest.raises(DifftuneError, match=offline) as caught:
        describe_model("someone/no-such-model")
    assert "\n" not in str(caught.value)
