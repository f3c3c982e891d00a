"""The teacher cache: the base model's own samples from stored noise, resumable, refusing mixtures."""

import json

import numpy as np
import pytest
import torch

import difftune
from difftune.errors import DifftuneError
from difftune.families.sd import SDFamily
from difftune.families.sd3 import SD3Family
from difftune.hipa import teacher as teacher_module
from difftune.hipa.teacher import (
    TeacherCache,
    TeacherSettings,
    generate_teacher_samples,
    read_prompts,
    resolve_scheduler,
    sample_noise,
)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SIZE = 32  # pixels; latents 16x16 keep the tiny models fast
SETTINGS = TeacherSettings(num_inference_steps=2, guidance_scale=3.0, scheduler="ddim", seed=7)


def generate(pipe, prompts, directory, settings, **kwargs):
    return generate_teacher_samples(pipe, prompts, directory, settings, height=SIZE, width=SIZE,
                                    show_progress=False, **kwargs)


def _pipeline_sample(pipe, prompt, noise, settings, scheduler_name):
    """The same sample drawn directly through the pipeline, decoded by the pipeline itself."""
    original = pipe.scheduler
    pipe.scheduler = resolve_scheduler(pipe, scheduler_name)
    try:
        return pipe(prompt, negative_prompt=settings.negative_prompt if settings.guidance_scale > 1 else None,
                    num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                    height=SIZE, width=SIZE, latents=noise[None], output_type="np").images[0]
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("builder, settings", [
    (SDFamily.build_tiny, SETTINGS),
    (SD3Family.build_tiny, TeacherSettings(num_inference_steps=2, guidance_scale=1.0, samples_per_prompt=2)),
])
def test_cache_holds_the_base_models_samples_from_stored_noise(tmp_path, builder, settings):
    pipe = builder()
    cache = generate(pipe, PROMPTS[:2], tmp_path, settings, batch_size=2)
    n = settings.samples_per_prompt
    assert len(cache) == 2 * n and cache.complete
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["num_inference_steps"] == 2 and manifest["latent_shape"] == [4, 16, 16]
    for i in range(len(cache)):
        sample = cache[i]
        assert sample["prompt"] == PROMPTS[i // n]
        torch.testing.assert_close(sample["noise"], sample_noise([4, 16, 16], settings.seed, i))
        expected = _pipeline_sample(pipe, sample["prompt"], sample["noise"], settings, settings.scheduler)
        stored = (sample["image"].permute(1, 2, 0).numpy() + 1) / 2
        np.testing.assert_allclose(stored, expected, atol=2e-3)  # image stored in fp16
        assert (tmp_path / "images" / f"{i:06d}.png").is_file()
    if n == 2:  # two draws of one prompt use different noise
        assert not torch.equal(cache[0]["noise"], cache[1]["noise"])


def test_interrupted_generation_resumes_where_it_stopped(tmp_path, monkeypatch):
    pipe = SDFamily.build_tiny()
    write = teacher_module._write_sample
    written: list[int] = []

    def interrupt_after_one(cache, index, *args):
        if len(written) == 1:
            raise KeyboardInterrupt
        written.append(index)
        write(cache, index, *args)

    monkeypatch.setattr(teacher_module, "_write_sample", interrupt_after_one)
    with pytest.raises(KeyboardInterrupt):
        generate(pipe, PROMPTS[:2], tmp_path / "resumed", SETTINGS)
    partial = TeacherCache(tmp_path / "resumed")
    assert partial.missing() == [1] and not partial.complete
    with pytest.raises(DifftuneError, match="not generated yet"):
        partial[1]
    before = partial.sample_path(0).stat().st_mtime_ns

    written.clear()
    monkeypatch.setattr(teacher_module, "_write_sample", lambda cache, index, *args: (
        written.append(index), write(cache, index, *args)))
    resumed = generate(pipe, PROMPTS[:2], tmp_path / "resumed", SETTINGS)
    assert written == [1] and resumed.complete
    assert resumed.sample_path(0).stat().st_mtime_ns == before

    monkeypatch.setattr(teacher_module, "_write_sample", write)
    whole = generate(pipe, PROMPTS[:2], tmp_path / "whole", SETTINGS, batch_size=2)
    for i in range(2):
        for key in ("noise", "latents", "image"):
            torch.testing.assert_close(resumed[i][key], whole[i][key], atol=2e-3, rtol=0)


def test_other_settings_or_model_are_refused(tmp_path):
    pipe = SDFamily.build_tiny()
    generate(pipe, PROMPTS[:1], tmp_path, SETTINGS)
    changed = TeacherSettings(num_inference_steps=3, guidance_scale=3.0, scheduler="ddim", seed=7)
    with pytest.raises(DifftuneError, match="settings"):
        generate(pipe, PROMPTS[:1], tmp_path, changed)
    with pytest.raises(DifftuneError, match="denoiser"):  # same config, other weights
        generate(SDFamily.build_tiny(seed=1), PROMPTS[:1], tmp_path, SETTINGS)
    with pytest.raises(DifftuneError, match="entries"):
        generate(pipe, PROMPTS[:2], tmp_path, SETTINGS)
    difftune.add_adapter(pipe.unet, "lora", rank=2)
    with pytest.raises(DifftuneError, match="adapter is attached"):
        generate(pipe, PROMPTS[:1], tmp_path / "other", SETTINGS)


def test_bad_inputs_are_refused(tmp_path):
    pipe = SDFamily.build_tiny()
    with pytest.raises(DifftuneError, match="unknown scheduler"):
        resolve_scheduler(pipe, "no-such-scheduler")
    with pytest.raises(DifftuneError, match="samples_per_prompt"):
        generate_teacher_samples(pipe, PROMPTS, tmp_path, TeacherSettings(samples_per_prompt=0))
    with pytest.raises(DifftuneError, match="multiple of"):
        generate_teacher_samples(pipe, PROMPTS, tmp_path, SETTINGS, height=60, width=64)
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(DifftuneError, match="no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(DifftuneError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(DifftuneError, match="not a teacher cache"):
        TeacherCache(tmp_path)


def test_read_prompts_skips_blank_lines_and_comments(tmp_path):
    (tmp_path / "prompts.txt").write_text("# header\na red circle\n\n  a blue square  \n")
    assert read_prompts(tmp_path / "prompts.txt") == ["a red circle", "a blue square"]
