"""The procedural world, its pretraining stages, the subject, and the shipped embedded model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from difftune.model_factory import EMBEDDED_MODEL_DIR
from difftune.world import pretrain, scenes
from difftune.world.clip_model import (
    build_world_clip,
    build_world_tokenizer,
    classify_color_shape,
    load_world_clip,
    single_object_scenes,
    zero_shot_accuracy,
)
from difftune.world.scenes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SPLITS,
    TEXTURE_SHADE,
    WORLD_VOCABULARY,
    WorldDataset,
    iterate_world,
    render_scene,
    sample_scene,
    world_scene,
)

torch.set_num_threads(1)
SUBJECTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "subjects"
needs_weights = pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(),
                                   reason="the embedded model has not been trained into assets/ yet")


# ---------------------------------------------------------------- the world

def test_scenes_are_a_pure_function_of_the_seed():
    for seed in (0, 7, 123_456):
        assert sample_scene(seed) == sample_scene(seed)
        np.testing.assert_array_equal(render_scene(sample_scene(seed)), render_scene(sample_scene(seed)))
    captions = {world_scene("train", i).caption() for i in range(50)}
    assert len(captions) > 40, "different seeds should give different scenes"


def test_splits_are_disjoint_seed_ranges():
    ranges = sorted(SPLITS.values())
    for (_, end), (next_start, _) in itertools.pairwise(ranges):
        assert end <= next_start
    names = ("train", "heldout_a", "heldout_b")
    seeds = {name: {scenes.split_seed(name, i) for i in range(100)} for name in names}
    assert not seeds["train"] & seeds["heldout_a"]
    assert not seeds["heldout_a"] & seeds["heldout_b"]
    assert scenes.split_of_seed(scenes.split_seed("heldout_b", 5)) == "heldout_b"
    with pytest.raises(ValueError, match="unknown world split 'test'"):
        scenes.split_seed("test", 0)
    with pytest.raises(ValueError, match="outside split"):
        scenes.split_seed("heldout_a", SPLITS["heldout_a"][1])


def test_captions_state_the_scene_attributes():
    for index in range(200):
        scene = world_scene("heldout_a", index)
        words = scene.caption().split()
        assert f"{scene.background} background" in scene.caption()
        for obj in scene.objects:
            for attribute in (obj.color, obj.shape, obj.size):
                assert attribute in words
            assert (obj.texture in words) == (obj.texture != "plain")
        if scene.relation:
            first, second = scene.objects
            before, after = scene.caption().split(f" {scene.relation} ")
            assert first.phrase() == before and after.startswith(second.phrase() + " ")
            axis = 0 if scene.relation == "left of" else 1
            assert first.center[axis] < second.center[axis] and first.color != second.color
        else:
            assert scenes.POSITION_PHRASES[scene.position] in scene.caption()
        # Shortened captions keep colour and shape, and stay true.
        short = scene.caption(np.random.default_rng(index), drop_probability=1.0).split()
        for obj in scene.objects:
            assert obj.color in short and obj.shape in short
        assert not {*BACKGROUNDS, "small", "large", "striped", "dotted", "checkered"} & set(short)
        assert set(words) <= set(WORLD_VOCABULARY) and scenes.RARE_IDENTIFIER not in words


def test_world_has_the_promised_variety():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8
    sampled = [world_scene("train", i) for i in range(600)]
    objects = [o for s in sampled for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(COLORS)
    assert {o.texture for o in objects} == set(scenes.TEXTURES)
    assert {s.background for s in sampled} == set(BACKGROUNDS)
    assert {len(s.objects) for s in sampled} == {1, 2}


def test_every_world_word_is_one_token():
    tokenizer = build_world_tokenizer()
    for word in WORLD_VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    caption = world_scene("train", 3).caption()
    assert len(tokenizer(caption).input_ids) == len(caption.split()) + 2


def test_hard_negatives_change_one_detail_and_are_false():
    from difftune.world.clip_model import hard_negatives

    rng = np.random.default_rng(0)
    for index in range(100):
        scene = world_scene("train", index)
        caption = scene.caption(rng, 0.3)
        negatives = hard_negatives(caption, rng)
        shape_swap, second = (negatives[1], negatives[0]) if scene.relation else negatives
        old, new = caption.split(), shape_swap.split()
        changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
        assert changed and all(b in SHAPES for _, b in changed if b not in ("a", "an"))
        assert second != caption and second != shape_swap
        if scene.relation:
            assert sorted(second.split()) == sorted(old)  # the same words, objects swapped
        else:
            assert [w for w in second.split() if w not in SHAPES] == [w for w in old if w not in SHAPES]


def test_shorter_padding_gives_the_same_text_features():
    from difftune.world.clip_model import text_features, tokenize

    tokenizer = build_world_tokenizer()
    model = build_world_clip(tokenizer, pretrain.PretrainConfig.tiny().clip_size)
    captions = ["a red circle", "an orange dotted star at the left on a white background"]
    full, short = tokenize(tokenizer, captions), tokenize(tokenizer, captions, padding="longest")
    assert full.shape[1] == tokenizer.model_max_length > short.shape[1]
    with torch.no_grad():
        assert torch.allclose(text_features(model, full), text_features(model, short), atol=1e-5)


def _coverage(obj) -> np.ndarray:
    """Fraction of each 64×64 pixel covered by the object (box filter of the 4× mask)."""
    mask = scenes.shape_mask(obj.shape, obj.center, obj.radius, obj.rotation)
    return mask.reshape(64, 4, 64, 4).mean(axis=(1, 3))


def test_rendered_objects_have_their_colour_and_the_background_its_colour():
    checked = 0
    for index in range(40):
        scene = world_scene("train", index)
        image = render_scene(scene).astype(np.float64)
        coverages = [_coverage(obj) for obj in scene.objects]
        for index_in_scene, obj in enumerate(scene.objects):
            painted_over = [c > 0 for c in coverages[index_in_scene + 1:]]
            interior = (coverages[index_in_scene] == 1) & ~np.logical_or.reduce([np.zeros((64, 64), bool),
                                                                                 *painted_over])
            pixels = image[interior]
            assert len(pixels) > 4
            body = np.asarray(obj.rgb, dtype=np.float64)
            # Every interior pixel is the body colour darkened by at most the texture shade:
            # the same hue, never a neighbour's colour or the background.
            ratio = (pixels @ body) / (body @ body)
            residual = np.abs(pixels - ratio[:, None] * body).max()
            assert residual < 6, (scene.caption(), residual)
            assert ratio.min() > TEXTURE_SHADE - 0.03 and ratio.max() < 1.02
            if obj.texture == "plain":
                assert np.abs(pixels - body).max() <= 1
            else:
                assert ratio.min() < 0.7, f"{obj.texture} texture left no dark pixels"
            checked += 1
        background = image[np.logical_and.reduce([c == 0 for c in coverages])]
        assert np.abs(background - np.asarray(scene.background_rgb)).max() <= 1
    assert checked >= 40


def test_dataset_and_stream_yield_matching_images_and_captions():
    dataset = WorldDataset("heldout_b", 4)
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["caption"] == world_scene("heldout_b", 2).caption()
    expected = scenes.to_tensor(render_scene(world_scene("heldout_b", 2))[None])[0]
    assert torch.equal(item["pixel_values"], expected)
    with pytest.raises(IndexError):
        dataset[4]
    images, captions = next(iterate_world("heldout_b", 3))
    assert images.shape == (3, 3, 64, 64) and torch.equal(images[2], expected)
    assert captions[2] == item["caption"]
    rendered = render_scene(world_scene("heldout_b", 2))
    np.testing.assert_array_equal(scenes.to_uint8(expected[None])[0], rendered)


# ---------------------------------------------------------------- pretraining stages (tiny)

@pytest.fixture(scope="module")
def tiny():
    config = pretrain.PretrainConfig.tiny(steps=4)
    images = np.stack([render_scene(world_scene("train", i)) for i in range(config.train_scenes)])
    data = pretrain.TrainingData([world_scene("train", i) for i in range(config.train_scenes)], images,
                                 seed=0, caption_drop_probability=0.3)
    return config, data


def _same_parameters(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                 strict=True))


def test_batches_are_a_pure_function_of_stage_and_step(tiny):
    _, data = tiny
    first, again = data.batch("clip", 3, 4), data.batch("clip", 3, 4)
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1] == again[1]
    other = data.batch("clip", 4, 4)
    assert other[1] != first[1] or not np.array_equal(other[0], first[0])


def test_clip_stage_resumes_exactly(tiny, tmp_path):
    config, data = tiny
    straight, _, record = pretrain.train_clip(data, tmp_path / "a", config, progress=False)
    assert record["step"] == 4 and (tmp_path / "a" / "final" / "model.safetensors").is_file()
    initial = build_world_clip(build_world_tokenizer(), config.clip_size)
    assert not _same_parameters(straight, initial), "training changed nothing"

    _, _, partial = pretrain.train_clip(data, tmp_path / "b", config, progress=False, stop_after=2)
    assert partial["step"] == 2 and not (tmp_path / "b" / "final").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain.train_clip(data, tmp_path / "b", config, progress=False)
    resumed, _, record = pretrain.train_clip(data, tmp_path / "b", config, resume=True, progress=False)
    assert record["step"] == 4
    assert _same_parameters(straight, resumed)
    loaded, tokenizer = load_world_clip(tmp_path / "b" / "final")
    assert _same_parameters(loaded, resumed) and len(tokenizer) == len(build_world_tokenizer())


def test_clip_image_stage_locks_the_text_tower_and_resumes_exactly(tiny, tmp_path):
    config, data = tiny
    joint, tokenizer, _ = pretrain.train_clip(data, tmp_path / "clip", config, progress=False)
    straight, _ = pretrain.train_clip_image(data, tmp_path / "a", config, joint, tokenizer, progress=False)
    pretrain.train_clip_image(data, tmp_path / "b", config, joint, tokenizer, progress=False, stop_after=2)
    resumed, record = pretrain.train_clip_image(data, tmp_path / "b", config, joint, tokenizer,
                                                resume=True, progress=False)
    assert record["step"] == 4 and _same_parameters(straight, resumed)
    # The text tower is bit-identical to the joint stage's: it is the pipeline's text encoder.
    assert _same_parameters(joint.text_model, resumed.text_model)
    # Everything on the image side moved, and so did the text projection.
    for name in ("vision_model", "visual_projection", "text_projection"):
        assert not _same_parameters(getattr(joint, name), getattr(resumed, name)), name
    loaded, _ = load_world_clip(tmp_path / "b" / "final")
    assert _same_parameters(loaded, resumed)


def test_vae_stage_resumes_exactly_and_sets_the_scaling_factor(tiny, tmp_path):
    config, data = tiny
    straight, _ = pretrain.train_vae(data, tmp_path / "a", config, progress=False)
    pretrain.train_vae(data, tmp_path / "b", config, progress=False, stop_after=3)
    resumed, record = pretrain.train_vae(data, tmp_path / "b", config, resume=True, progress=False)
    assert record["step"] == 4 and _same_parameters(straight, resumed)
    with torch.no_grad():
        posterior = straight.encode(data.pixels(np.arange(16))).latent_dist
    latents = posterior.sample() * straight.config.scaling_factor
    assert straight.config.scaling_factor != 0.18215
    assert 0.6 < float(latents.std()) < 1.6


def test_vae_decoder_stage_trains_only_the_decoder_and_resumes_exactly(tiny, tmp_path):
    config, data = tiny
    joint, _ = pretrain.train_vae(data, tmp_path / "vae", config, progress=False)
    straight, _ = pretrain.train_vae_decoder(data, tmp_path / "a", config, joint, progress=False)
    pretrain.train_vae_decoder(data, tmp_path / "b", config, joint, progress=False, stop_after=2)
    resumed, record = pretrain.train_vae_decoder(data, tmp_path / "b", config, joint, resume=True,
                                                 progress=False)
    assert record["step"] == 4 and _same_parameters(straight, resumed)
    # The latent space is the joint stage's, bit for bit: the UNet trained on it stays valid.
    for name in ("encoder", "quant_conv"):
        assert _same_parameters(getattr(joint, name), getattr(resumed, name)), name
    for name in ("decoder", "post_quant_conv"):
        assert not _same_parameters(getattr(joint, name), getattr(resumed, name)), name
    assert resumed.config.scaling_factor == joint.config.scaling_factor
    loaded = pretrain.load_finished_vae(tmp_path / "b")
    assert _same_parameters(loaded, resumed)


def test_unet_stage_resumes_exactly_with_its_ema(tiny, tmp_path):
    config, data = tiny
    clip_model, tokenizer, _ = pretrain.train_clip(data, tmp_path / "clip", config, progress=False)
    vae, _ = pretrain.train_vae(data, tmp_path / "vae", config, progress=False)
    models = (clip_model, tokenizer, vae)
    straight, _ = pretrain.train_unet(data, tmp_path / "a", config, *models, progress=False)
    pretrain.train_unet(data, tmp_path / "b", config, *models, progress=False, stop_after=2)
    checkpoint = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert checkpoint["record"]["step"] == 2 and checkpoint["ema"]["updates"] == 2
    resumed, record = pretrain.train_unet(data, tmp_path / "b", config, clip_model, tokenizer, vae,
                                          resume=True, progress=False)
    assert record["step"] == 4 and _same_parameters(straight, resumed)
    # The saved UNet holds the EMA weights, not the last raw ones.
    raw = pretrain.build_world_unet(config, clip_model.config.text_config.hidden_size)
    raw.load_state_dict(torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"])
    assert not _same_parameters(raw, resumed)


def test_pretrain_script_help_states_the_config_defaults_and_bad_flags_are_named(capsys):
    script = load_script("train_scripts/pretrain_world.py")
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    defaults = pretrain.PretrainConfig()
    for stage in pretrain.STAGES:
        settings = getattr(defaults, stage)
        assert f"default {settings.steps} (batch {settings.batch_size})" in help_text, stage
    assert f"(default {defaults.train_scenes})" in help_text
    for flags, named in ((["--unet_steps", "0"], "--unet_steps"), (["--stages", "unet,vea"], "--stages")):
        with pytest.raises(SystemExit):
            script.parse_args(["--output_dir", "out", *flags])
        assert named in capsys.readouterr().err


def test_pretrain_all_writes_a_loadable_fp16_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    config = replace(pretrain.PretrainConfig.tiny(steps=2), train_scenes=8)
    model_dir = tmp_path / "model"
    records = pretrain.pretrain_all(tmp_path / "run", config, progress=False, model_dir=model_dir)
    assert [records[s]["step"] for s in pretrain.STAGES] == [2, 2, 2, 2, 2]
    with safe_open(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                   local_files_only=True)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.cross_attention_dim == 32
    assert len(pipe.tokenizer) == len(build_world_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    clip_model, _ = load_world_clip(model_dir / "world_clip", dtype=torch.float16)
    # The shipped CLIP is the image-tuned one, and its text tower is the pipeline's text encoder.
    image_tuned, _ = load_world_clip(tmp_path / "run" / "clip_image" / "final")
    assert _same_parameters(clip_model.vision_model, image_tuned.vision_model.half())
    assert _same_parameters(clip_model.text_model, pipe.text_encoder.half())
    # The shipped VAE is the decoder-tuned one.
    tuned_vae = pretrain.load_finished_vae(tmp_path / "run" / "vae_decoder")
    assert _same_parameters(pipe.vae.decoder, tuned_vae.decoder.half().float())
    # Skipping a finished stage reuses it; skipping an unfinished one is refused.
    pretrain.pretrain_all(tmp_path / "run", config, stages=("unet",), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="stage 'clip' is not finished"):
        pretrain.pretrain_all(tmp_path / "other", config, stages=("vae", "unet"), progress=False)
    # The VAE alone needs no CLIP (so the two can train in parallel processes).
    only_vae = pretrain.pretrain_all(tmp_path / "other", config, stages=("vae",), progress=False)
    assert list(only_vae) == ["vae"]


def test_world_clip_features_work_as_an_fid_extractor():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from difftune.metrics.features import ClipImageFeatures
    from difftune.world.quality import clip_fid

    model = build_world_clip(build_world_tokenizer(), pretrain.PretrainConfig.tiny().clip_size)
    features = ClipImageFeatures(model, mean=(0.5,) * 3, std=(0.5,) * 3)
    images = scenes.to_tensor(np.stack([render_scene(world_scene("heldout_a", i)) for i in range(40)]))
    as_uint8 = torch.from_numpy(scenes.to_uint8(images)).permute(0, 3, 1, 2)
    out = features(as_uint8)
    assert out.shape == (40, features.num_features) and out.dtype == torch.float64
    assert torch.allclose(out, features((images + 1) / 2), atol=1e-4)
    fid = FrechetInceptionDistance(feature=features, normalize=True)
    assert clip_fid(features, images, images) < 1e-3
    shifted = (images * 0.3).clamp(-1, 1)
    assert clip_fid(features, images, shifted) > 1e-2
    assert fid.inception is features


# ---------------------------------------------------------------- the DreamBooth subjects

@pytest.mark.parametrize("name", ["star", "heart", "diamond", "ring", "crescent"])
def test_subject_assets_are_rendered_deterministically(tmp_path, name):
    from PIL import Image

    from difftune.world import subject

    design = subject.SUBJECTS[name]
    info = subject.write_subject_assets(tmp_path, name)
    assert info["identifier"] == scenes.RARE_IDENTIFIER and info["class_shape"] in SHAPES
    assert info["instance_prompt"] == f"a large sks {info['class_name']}"
    assert info["class_prompt"] == f"a large {info['class_color']} {info['class_shape']}"
    images = [np.asarray(Image.open(tmp_path / entry["file"])) for entry in info["images"]]
    assert len({(e["background"], e["position"]) for e in info["images"]}) == len(images)
    hues = {"star": ("orange", "blue"), "heart": ("red", "yellow"), "diamond": ("purple", "cyan"),
            "ring": ("green",), "crescent": ("yellow",)}[name]
    for image, entry in zip(images, info["images"], strict=True):
        # Two hues on one object where the design says so, each covering more than a speck.
        for hue in hues:
            assert (np.abs(image.astype(int) - scenes.COLORS[hue]).max(-1) <= 2).sum() > 20, (name, hue)
        # The background shows through where a new shape has its hole or bite.
        background = np.asarray(scenes.BACKGROUNDS[entry["background"]])
        centre = np.round(subject.subject_views(name)[info["images"].index(entry)]["center"]).astype(int)
        pixel = image[centre[1], centre[0]].astype(int)
        assert (np.abs(pixel - background).max() <= 2) == (name in ("ring", "crescent")), (name, pixel)
    # Every image has a world caption that keeps the identifier before the class.
    captions = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [c["file_name"] for c in captions] == [e["file"] for e in info["images"]]
    for caption, entry in zip(captions, info["images"], strict=True):
        assert caption["text"] == entry["caption"] == design.caption(entry["position"], entry["background"])
        assert f"sks {info['class_name']}" in caption["text"] and entry["background"] in caption["text"]
    shipped = SUBJECTS_DIR / name
    assert (shipped / "subject.json").is_file(), f"{shipped} is not shipped"
    stored = json.loads((shipped / "subject.json").read_text())
    measured = stored.pop("measured")
    assert stored == info
    assert measured["class_shape_accuracy"] >= 0.8 and measured["class_color_accuracy"] >= 0.8
    assert 0.3 < measured["ceiling_clip_i"] < 1.0 and 0.2 < measured["vae_clip_i"] < 1.0
    assert (shipped / "metadata.jsonl").read_text() == (tmp_path / "metadata.jsonl").read_text()
    for entry, image in zip(info["images"], images, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(shipped / entry["file"])), image)


@needs_weights
def test_subject_measurement_matches_an_independent_count(tmp_path):
    """measure_subject's accuracy and ceiling, recomputed here from its own images and embeddings."""
    from PIL import Image

    from difftune.metrics.similarity import ClipSimilarity
    from difftune.world import subject
    from difftune.world.quality import SamplingSettings, generate, load_embedded_pipeline

    subject.write_subject_assets(tmp_path, "ring", count=3)
    pipe = load_embedded_pipeline(EMBEDDED_MODEL_DIR)
    model, tokenizer = load_world_clip(EMBEDDED_MODEL_DIR / "world_clip")
    similarity = ClipSimilarity.from_pretrained(EMBEDDED_MODEL_DIR / "world_clip")
    settings = SamplingSettings(steps=10, guidance_scale=5.0, seed=3, batch_size=8)
    info = subject.measure_subject(tmp_path, pipe, model, tokenizer, similarity, class_images=8,
                                   settings=settings)
    assert json.loads((tmp_path / "subject.json").read_text())["measured"] == info["measured"]
    class_images = generate(pipe, ["a large green circle"] * 8, settings)
    predictions = classify_color_shape(model, tokenizer, class_images)
    assert info["measured"]["class_shape_accuracy"] == sum(p[1] == "circle" for p in predictions) / 8
    instance = [Image.open(tmp_path / f"instance_{i:02d}.png") for i in range(3)]
    embeddings = similarity.image_embeddings(instance)
    pairs = [float(embeddings[i] @ embeddings[j]) for i in range(3) for j in range(3) if i != j]
    assert info["measured"]["ceiling_clip_i"] == pytest.approx(sum(pairs) / 6, abs=1e-4)
    # through the VAE, with diffusers' own image processing
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(instance)
        decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
    rebuilt = similarity.image_embeddings(pipe.image_processor.postprocess(decoded, output_type="pil"))
    pairs = [float(rebuilt[i] @ embeddings[j]) for i in range(3) for j in range(3) if i != j]
    assert info["measured"]["vae_clip_i"] == pytest.approx(sum(pairs) / 6, abs=2e-3)


# ---------------------------------------------------------------- the shipped model



@needs_weights
def test_shipped_world_clip_classifies_held_out_scenes():
    model, tokenizer = load_world_clip(EMBEDDED_MODEL_DIR / "world_clip")
    accuracy = zero_shot_accuracy(model, tokenizer, "heldout_b", count=200)
    assert accuracy["color"] >= 0.9 and accuracy["shape"] >= 0.85, accuracy


@needs_weights
def test_unet_speed_benchmark_times_the_shipped_unet_first(capsys):
    from diffusers import UNet2DConditionModel

    script = load_script("benchmarks/world_unet_speed.py")
    rows = script.main(["--steps", "1", "--warmup", "0", "--batch_size", "2"])
    shipped = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL_DIR / "unet")
    assert rows[0]["parameters"] == sum(p.numel() for p in shipped.parameters())
    assert rows[0]["heads"] == shipped.config.attention_head_dim
    assert len(rows) == len(script.VARIANTS) and all(r["steps_per_s"] > 0 for r in rows)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table) == len(rows) + 2 and table[2].startswith("| 64/128/128 | 8 |")  # header, rule, rows
    with pytest.raises(SystemExit):
        script.main(["--steps", "0"])
    assert "--steps must be a positive integer" in capsys.readouterr().err


@needs_weights
def test_shipped_pipeline_follows_held_out_prompts_offline():
    from difftune.world.quality import SamplingSettings, generate, load_embedded_pipeline

    pipe = load_embedded_pipeline(EMBEDDED_MODEL_DIR)
    assert pipe.vae_scale_factor == 4 and pipe.unet.dtype == torch.float32
    model, tokenizer = load_world_clip(EMBEDDED_MODEL_DIR / "world_clip")
    held_out = single_object_scenes("heldout_b", 8, start=500)
    prompts = [s.caption() for s in held_out]
    images = generate(pipe, prompts, SamplingSettings(steps=15, guidance_scale=5.0, seed=11))
    predictions = classify_color_shape(model, tokenizer, images)
    truth = [(s.objects[0].color, s.objects[0].shape) for s in held_out]
    # Measured on 1000 held-out captions: colour 97.9%, shape 80.2% (chance 12.5% and 14.3%);
    # on these eight, 8 and 6. By chance six right colours of eight happen about once in
    # 12000, five right shapes about twice in a thousand.
    color_correct = sum(p[0] == t[0] for p, t in zip(predictions, truth, strict=True))
    shape_correct = sum(p[1] == t[1] for p, t in zip(predictions, truth, strict=True))
    assert color_correct >= 6 and shape_correct >= 5, list(zip(prompts, predictions, strict=True))
    # The same prompts with colours swapped must be classified differently: prompts matter.
    swapped = [p.replace(t[0], "green" if t[0] != "green" else "red")
               for p, t in zip(prompts, truth, strict=True)]
    swapped_images = generate(pipe, swapped, SamplingSettings(steps=15, guidance_scale=5.0, seed=11))
    swapped_predictions = classify_color_shape(model, tokenizer, swapped_images)
    assert sum(p[0] != t[0] for p, t in zip(swapped_predictions, truth, strict=True)) >= 6  # measured 8
