"""difftune train-subject on the tiny Wan models from a folder of tiny clips: every method trains and
resumes bit-exactly (Wan 2.2: both experts), validation writes clips, the files load in WanPipeline with
the same frames, prior preservation generates class clips, and bad clips or flags stop it before loading."""

import numpy as np
import pytest
import torch
from conftest import die_after_first_checkpoint
from PIL import Image
from safetensors.torch import load_file

import difftune
import difftune.model_factory
from difftune.errors import DifftuneError
from difftune.model_factory import load_pipeline

QUIET = ["--report_to", "none", "--seed", "0"]
VIDEO = ["--resolution", "16", "--num_frames", "5", "--frame_buckets", "1"]
METHOD_OPTIONS = {"lora": ["--rank", "2"], "peft": ["--peft_type", "loha", "--rank", "2"],
                  "sara": ["--sara_budget", "0.05"], "svfit": [], "tlora": []}


def flags(clip_dir, out, model, method="lora", steps=2, *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", clip_dir,
            "--instance_prompt", "a sks square", "--output_dir", out, "--max_train_steps", steps,
            "--adapter", method, *METHOD_OPTIONS[method], *VIDEO, *QUIET, *extra]


def frames(pipe, seed=0):
    """The trainer's samples: 16x16 clips of 5 frames, 2 sampler steps."""
    return pipe("a sks square", num_inference_steps=2, height=16, width=16, num_frames=5,
                generator=torch.Generator().manual_seed(seed), output_type="np").frames


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
def test_every_method_trains_on_tiny_wan_from_clips(train_subject, clip_dir, tmp_path, method, capsys):
    out = tmp_path / method
    train_subject(*flags(clip_dir, out, "builtin:tiny-wan", method), "--learning_rate", 1e-2,
                  "--validation_prompt", "a sks square", "--validation_steps", 2,
                  "--num_validation_images", 1, "--validation_inference_steps", 2)
    assert "(wan, 16x16, 5 frames consecutive, shorter clips 1, no)" in capsys.readouterr().out
    for name in ("adapter.safetensors", "validation/step-000002.webp", "validation/step-000002.png",
                 "validation/step-000002.mp4", "samples.webp", "samples.png", "samples.mp4"):
        assert (out / name).is_file(), name
    with Image.open(out / "samples.webp") as clip:
        assert clip.n_frames == 5 and clip.size == (16, 16)
    card = (out / "README.md").read_text()
    assert "![sample](samples.webp)" in card and "![sample](samples.png)" in card and "num_frames=" in card
    # the strip is what a fresh pipeline holding the saved file samples
    ours = load_pipeline("builtin:tiny-wan")
    difftune.load_adapter(ours, out / "adapter.safetensors")
    drawn = (frames(ours)[0] * 255).round().astype(np.uint8)
    strip = np.asarray(Image.open(out / "samples.png"), dtype=int)
    assert np.abs(strip - np.concatenate(drawn, axis=1)).max() <= 1
    assert np.abs(frames(ours) - frames(load_pipeline("builtin:tiny-wan"))).max() > 1e-3  # it trained
    if method == "lora":  # the diffusers copy: WanPipeline's own loader gives the same frames
        theirs = load_pipeline("builtin:tiny-wan")
        theirs.load_lora_weights(out)
        assert np.abs(frames(theirs) - frames(ours)).max() < 1e-6


def run_flags(clip_dir, out, method, steps=4):
    # what carries state across steps: Adam moments, warm-up + cosine, flips, accumulation, LoRA dropout
    extra = ["--lora_dropout", "0.2"] if method == "lora" else []
    return [*flags(clip_dir, out, "builtin:tiny-wan22", method, steps, "--checkpointing_steps", 2,
                   "--lr_scheduler", "cosine", "--lr_warmup_steps", 1, "--learning_rate", 1e-3,
                   "--random_flip", "--gradient_accumulation_steps", 2, "--skip_final_inference", *extra)]


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
def test_both_experts_resume_bit_identically(train_subject, clip_dir, tmp_path, monkeypatch, method):
    full, split = tmp_path / "full", tmp_path / "split"
    train_subject(*run_flags(clip_dir, full, method))
    with monkeypatch.context() as patch:
        die_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            train_subject(*run_flags(clip_dir, split, method))
    train_subject(*run_flags(clip_dir, split, method), "--resume_from_checkpoint", "latest")
    uninterrupted, resumed = load_file(full / "adapter.safetensors"), load_file(split / "adapter.safetensors")
    assert {key.split(".")[0] for key in uninterrupted} == {"transformer", "transformer_2"}  # both experts
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    halfway = load_file(split / "checkpoint-2" / "adapter.safetensors")
    for expert in ("transformer.", "transformer_2."):  # the second half moved each expert
        keys = [k for k in uninterrupted if k.startswith(expert)]
        assert any(not torch.equal(uninterrupted[k], halfway[k]) for k in keys)
    assert difftune.read_adapter_info(full / "adapter.safetensors")["experts"].keys() == {"transformer_2"}


def test_expert_files_load_in_wan_pipeline_with_the_same_frames(train_subject, clip_dir, tmp_path):
    """--expert both: one difftune file, one diffusers file per expert; --expert low: the low-noise
    transformer alone, and a file diffusers loads into transformer_2."""
    for expert in ("both", "low"):
        out = tmp_path / expert
        train_subject(*flags(clip_dir, out, "builtin:tiny-wan22", "lora", 2), "--expert", expert,
                      "--learning_rate", 5e-2, "--skip_final_inference")
        info = difftune.read_adapter_info(out / "adapter.safetensors")
        assert info["component"] == ("transformer" if expert == "both" else "transformer_2")
        ours = load_pipeline("builtin:tiny-wan22")
        difftune.load_adapter(ours, out / "adapter.safetensors")
        trained = difftune.api.adapted_experts(ours)
        theirs = load_pipeline("builtin:tiny-wan22")
        if expert == "both":
            assert list(trained) == ["transformer_2"] and difftune.has_adapter(ours.transformer)
            theirs.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
        else:
            assert not difftune.has_adapter(ours.transformer) and difftune.has_adapter(ours.transformer_2)
            assert not (out / "pytorch_lora_weights.safetensors").exists()
        theirs.load_lora_weights(out, weight_name="pytorch_lora_weights_transformer_2.safetensors",
                                 load_into_transformer_2=True)
        assert "load_into_transformer_2=True" in (out / "README.md").read_text()
        base = frames(load_pipeline("builtin:tiny-wan22"), seed=1)
        assert np.abs(frames(ours, seed=1) - base).max() > 1e-3
        assert np.abs(frames(theirs, seed=1) - frames(ours, seed=1)).max() < 1e-6


def test_prior_preservation_with_class_clips_in_bf16_with_gradient_checkpointing(train_subject, clip_dir,
                                                                               tmp_path, monkeypatch):
    loaded = []
    original = train_subject.module.load_pipeline

    def recording(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", recording)
    out, classes = tmp_path / "out", tmp_path / "classes"
    train_subject(*flags(clip_dir, out, "builtin:tiny-wan", "lora", 2), "--with_prior_preservation",
                  "--class_data_dir", classes, "--class_prompt", "a square", "--num_class_images", 2,
                  "--class_inference_steps", 2, "--mixed_precision", "bf16", "--gradient_checkpointing",
                  "--skip_final_inference")
    assert sorted(p.name for p in classes.iterdir()) == ["class-00000.webp", "class-00001.webp"]
    with Image.open(classes / "class-00000.webp") as clip:
        assert clip.n_frames == 5 and clip.size == (16, 16)
    transformer = loaded[0].transformer
    assert transformer.is_gradient_checkpointing
    trainable = dict(difftune.named_trainable_parameters(transformer))
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.bfloat16 for n, p in transformer.named_parameters() if n not in trainable)
    assert loaded[0].vae.dtype == torch.float32


def test_bad_clips_and_flags_are_refused_before_the_model_loads(train_subject, clip_dir, subject_dir,
                                                               tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", must_not_load)
    check = train_subject.module.check_before_loading
    base = flags(clip_dir, tmp_path / "o", "builtin:tiny-wan")
    cases = [
        (["--num_frames", "13", "--frame_buckets", "13"], r"clip .*a\.mp4 is too short: 9 frames give 9"),
        (["--num_frames", "6"], r"--num_frames 6: clips of this model have 1 \+ 4·k frames"),
        (["--resolution", "24x16"], r"--resolution must be a multiple of 16 .*got 24x16"),
        (["--expert", "low"], r"--expert low: builtin:tiny-wan has one denoiser"),
        (["--fps", "4", "--frame_stride", "2"], "give --frame_stride or --fps, not both"),
        # the checks on the settings fields (VideoSettings, InstanceImages, LossOptions)
        (["--frame_stride", "0"], r"--frame_stride must be at least 1, got 0"),
        (["--fps", "-2"], r"--fps must be positive, got -2.0"),
        (["--frame_buckets", "0"], r"--frame_buckets must all be at least 1, got \[0\]"),
        (["--resolution", "0x16"], r"--resolution must be positive, got \(0, 16\)"),
        (["--flow_shift", "0"], r"--flow_shift must be positive, got 0.0"),
    ]
    for extra, message in cases:
        with pytest.raises(DifftuneError, match=message):
            check([*map(str, base), *extra])
    with pytest.raises(DifftuneError, match=r"--expert both: adapts transformer and transformer_2"):
        check([*map(str, flags(clip_dir, tmp_path / "o", "builtin:tiny-wan22")), "--export", "comfyui"])
    image_model = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", subject_dir,
                   "--instance_prompt", "a sks disc", "--output_dir", tmp_path / "p"]
    with pytest.raises(DifftuneError, match=r"--num_frames only apply to video models \(Wan\); the base"):
        check([*map(str, image_model), "--num_frames", "5"])
    with pytest.raises(DifftuneError, match="--expert only apply to Wan"):
        check([*map(str, image_model), "--expert", "high"])
