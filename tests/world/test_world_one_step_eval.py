"""The one-step evaluation path (eval/world_quality.py --one_step_adapter) on tiny models: a tiny SD
pipeline whose random LoRA is the "student", judged by a tiny random world CLIP; every number is
recomputed here from independently generated images."""

import json

import numpy as np
import pytest
import torch
from conftest import command_module, randomize_adapter
from PIL import Image

import difftune
from difftune.errors import DifftuneError
from difftune.families.sd import SDFamily
from difftune.hipa.one_step import generate_one_step
from difftune.hipa.teacher import TeacherCache, sample_noise
from difftune.metrics.features import ClipImageFeatures
from difftune.model_factory import load_pipeline
from difftune.world.clip_model import (
    WorldClipSize,
    accuracy_against,
    build_world_clip,
    build_world_tokenizer,
    classify_color_shape,
    load_world_clip,
    save_world_clip,
    single_object_scenes,
)
from difftune.world.one_step_quality import held_out_captions, pil_to_tensor
from difftune.world.quality import clip_fid, real_images
from difftune.world.scenes import world_scene

COUNT = 5
TEACHER_STEPS = 2


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A folder laid out like assets/embedded_model (pipeline + world_clip) and a LoRA file for it."""
    folder = tmp_path_factory.mktemp("tiny_world_model")
    pipe = SDFamily.build_tiny()
    pipe.save_pretrained(folder)
    tokenizer = build_world_tokenizer()
    size = WorldClipSize(text_width=32, text_layers=1, vision_width=32, vision_layers=1, heads=2,
                         projection_dim=16)
    save_world_clip(build_world_clip(tokenizer, size), tokenizer, folder / "world_clip")
    difftune.add_adapter(pipe.unet, "lora", rank=4)
    randomize_adapter(pipe.unet, std=0.2)
    adapter = folder / "adapter.safetensors"
    difftune.save_adapter(pipe.unet, adapter)
    return folder, adapter


@pytest.fixture(scope="module")
def world_quality():
    return command_module("world_quality")


def run(world_quality, folder, adapter, output, *extra):
    world_quality.main(["--one_step_adapter", str(adapter), "--model_dir", str(folder),
                        "--prompts", str(COUNT), "--output_dir", str(output),
                        "--teacher_steps", str(TEACHER_STEPS),
                        "--batch_size", "3", *extra])
    return json.loads((output / "results.json").read_text())


def test_held_out_captions_are_the_first_scenes_and_the_first_one_object_scenes():
    captions = held_out_captions(COUNT)
    prompts = captions.prompts
    assert [prompts[i] for i in captions.fid] == [world_scene("heldout_a", i).caption() for i in range(COUNT)]
    singles = single_object_scenes("heldout_a", COUNT)
    assert [prompts[i] for i in captions.accuracy] == [s.caption() for s in singles]
    assert captions.truth == [(s.objects[0].color, s.objects[0].shape) for s in singles]
    assert len(set(prompts)) == len(prompts)  # each scene once, shared rows not generated twice


def test_three_generators_measured_from_the_same_noise(tiny_world, world_quality, tmp_path, capsys):
    folder, adapter = tiny_world
    output = tmp_path / "eval"
    report = run(world_quality, folder, adapter, output)
    table = capsys.readouterr().out
    for row in ("one-step student", "base one step", f"teacher ({TEACHER_STEPS} steps", "real vs real"):
        assert row in table
    captions = held_out_captions(COUNT)
    cache = TeacherCache(output / "teacher")
    assert [e["prompt"] for e in cache.entries] == captions.prompts
    noises = torch.stack([sample_noise(cache.manifest["latent_shape"], 0, i) for i in range(len(cache))])
    assert torch.equal(noises, torch.stack([cache[i]["noise"] for i in range(len(cache))]))

    # the three columns, regenerated here: the adapter's one step, the plain base one step, the cache
    base = load_pipeline(str(folder))
    student = load_pipeline(str(folder))
    difftune.load_adapter(student, adapter)

    def one_step(pipe):
        output = generate_one_step(pipe, captions.prompts, latents=noises, output_type="pil")
        return pil_to_tensor(output.images)

    columns = {"one-step student": one_step(student), "base one step": one_step(base),
               "teacher": pil_to_tensor([Image.open(cache.image_path(i)).convert("RGB")
                                         for i in range(len(cache))])}
    assert not torch.equal(columns["one-step student"], columns["base one step"])

    features = ClipImageFeatures.from_pretrained(folder / "world_clip")
    clip_model, tokenizer = load_world_clip(folder / "world_clip")
    real_b = real_images("heldout_b", COUNT)
    for name, pixels in columns.items():
        row = report["generators"][name]
        expected = clip_fid(features, real_b, pixels[captions.fid])
        assert row["fid"] == pytest.approx(expected, rel=1e-4, abs=1e-3)
        accuracy = accuracy_against(classify_color_shape(clip_model, tokenizer, pixels[captions.accuracy]),
                                    captions.truth)
        assert (row["color"], row["shape"]) == (accuracy["color"], accuracy["shape"])
        assert 0 <= row["clip_score"] <= 100 and row["seconds_per_image"] > 0
    real_a = real_images("heldout_a", COUNT)
    reference = report["reference"]
    assert reference["fid_real_vs_real"] == pytest.approx(clip_fid(features, real_b, real_a), rel=1e-4)
    counts = (reference["fid_count"], reference["accuracy_count"], reference["feature_dim"])
    assert counts == (COUNT, COUNT, 16)
    assert report["teacher"]["num_inference_steps"] == TEACHER_STEPS
    # the grid: a header row, then one row per prompt with the three images side by side (2x)
    grid = np.asarray(Image.open(output / "comparison.png"))
    pixels = ((columns["teacher"][captions.accuracy[0]].permute(1, 2, 0) + 1) * 127.5).round().byte()
    first = np.asarray(Image.fromarray(pixels.numpy()).resize((128, 128), Image.NEAREST))
    assert np.array_equal(grid[16:16 + 128, 6 + 2 * 134:6 + 2 * 134 + 128], first)


def test_rerun_reuses_the_teacher_cache_and_refuses_another_teacher(tiny_world, world_quality, tmp_path):
    folder, adapter = tiny_world
    output = tmp_path / "eval"
    first = run(world_quality, folder, adapter, output)
    stamps = {p: p.stat().st_mtime_ns for p in (output / "teacher" / "samples").iterdir()}
    (output / "teacher" / "samples" / "000002.safetensors").unlink()  # as if interrupted there
    del stamps[output / "teacher" / "samples" / "000002.safetensors"]
    second = run(world_quality, folder, adapter, output)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished samples were not redone
    for name, row in first["generators"].items():
        for key in ("fid", "clip_score", "color", "shape"):
            assert second["generators"][name][key] == pytest.approx(row[key], rel=1e-6)
    with pytest.raises(DifftuneError, match="teacher cache made with other settings"):
        run(world_quality, folder, adapter, output, "--teacher_guidance_scale", "2.0")


def test_missing_adapter_is_refused_before_any_model_loads(world_quality, tmp_path):
    with pytest.raises(SystemExit):
        world_quality.main(["--one_step_adapter", str(tmp_path / "none.safetensors")])
