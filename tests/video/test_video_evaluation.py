"""The subject evaluation of a video model (difftune evaluate on builtin:tiny-wan): CLIP-T / CLIP-I
over every frame, temporal consistency as the mean CLIP cosine of consecutive frames, each against a
computation by hand from the tiny CLIP model."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import build, command_module, make_clips, moving_square, randomize_adapter

import difftune
from difftune.errors import DifftuneError
from difftune.metrics import ClipSimilarity
from difftune.metrics.video import subject_frames, temporal_consistency
from difftune.video.clips import read_clip


def unit(embeddings):
    embeddings = embeddings.double()
    return embeddings / embeddings.norm(dim=1, keepdim=True)


def test_temporal_consistency_is_the_mean_cosine_of_consecutive_frames(tiny_clip_dir):
    clip = ClipSimilarity.from_pretrained(str(tiny_clip_dir))
    moving, still = moving_square(5, seed=0), [moving_square(1, seed=4)[0]] * 3
    pairs = [pair for frames in (moving, still) for pair in itertools.pairwise(frames)]
    by_hand = np.mean([float(unit(clip.image_embeddings([a]))[0] @ unit(clip.image_embeddings([b]))[0])
                       for a, b in pairs])
    assert temporal_consistency(clip, [moving, still]) == pytest.approx(by_hand, abs=1e-9)
    assert temporal_consistency(clip, [still]) == pytest.approx(1.0, abs=1e-9)  # a still picture
    assert temporal_consistency(clip, [moving[:1]]) is None  # no pair of frames


def test_evaluate_subject_scores_a_video_model_frame_by_frame(tmp_path, tiny_clip_dir):
    subject = make_clips(tmp_path / "subject")
    (subject / "subject.json").write_text(json.dumps({"identifier": "sks", "class_name": "square"}))
    pipe = build("wan")
    difftune.add_adapter(pipe, "lora", targets="attn", rank=2)
    randomize_adapter(pipe, std=0.3)
    lora = difftune.save_adapter(pipe, tmp_path / "lora" / "adapter.safetensors",
                                 base_model="builtin:tiny-wan")
    out = tmp_path / "eval"
    script = command_module("evaluate_subject")
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-wan", "--adapter", f"lora={lora}",
            "--include_base", "--instance_data_dir", str(subject), "--prompts", "dreambooth",
            "--num_prompts", "2", "--images_per_prompt", "1", "--num_inference_steps", "2", "--height", "16",
            "--width", "16", "--num_frames", "5", "--guidance_scale", "1", "--clip_model", str(tiny_clip_dir),
            "--no_class_prompts", "--output_dir", str(out)]
    results = script.main(argv)
    clip = ClipSimilarity.from_pretrained(str(tiny_clip_dir))
    reference = unit(clip.image_embeddings(subject_frames(subject)))
    assert len(subject_frames(subject)) == 9 + 11 + 9 + 1  # every frame of every clip, and the still
    for result in results:
        assert result["generated_clips"] == 2 and result["frames_per_clip"] == 5
        assert result["generated_images"] == 10  # the image metrics count frames
        images = out / result["name"] / "subject" / "images"
        clips = [read_clip(images / f"p0{p}_0.webp")[0] for p in range(2)]
        frames = [frame for clip_frames in clips for frame in clip_frames]
        generated = unit(clip.image_embeddings(frames))
        assert result["clip_i"] == pytest.approx(float((generated @ reference.T).mean()), abs=1e-4)
        consecutive = torch.cat([(unit(clip.image_embeddings(c))[1:] * unit(clip.image_embeddings(c))[:-1])
                                 .sum(dim=1) for c in clips])
        assert result["temporal_consistency"] == pytest.approx(float(consecutive.mean()), abs=1e-4)
    assert results[0]["clip_i"] != results[1]["clip_i"]  # the adapter changed the clips
    table = (out / "results.md").read_text()
    assert "| frames | temporal |" in table
    with pytest.raises(DifftuneError, match=r"--num_frames 4: clips of builtin:tiny-wan have 1 \+ 4·k"):
        script.main([*argv[:-1], str(tmp_path / "again"), "--num_frames", "4"])
    with pytest.raises(DifftuneError, match="--num_frames applies to video models"):
        script.main(["--pretrained_model_name_or_path", "builtin:tiny-sd", "--include_base",
                     "--instance_data_dir", str(subject), "--num_frames", "5", "--output_dir",
                     str(tmp_path / "sd")])
