"""--train_text_encoder in the subject trainer: trained, saved in one file, reloaded, resumed."""

import pytest
import torch
from conftest import generate
from safetensors.torch import load_file

import difftune
from difftune.model_factory import load_pipeline


def flags(subject_dir, out, *extra, model="builtin:tiny-sd", method="lora", steps=4):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--adapter", method,
            "--max_train_steps", steps, "--learning_rate", 1e-2, "--seed", 3, "--report_to", "none",
            "--skip_final_inference", "--train_text_encoder", *extra]


def text_encoder_tensors(path):
    return {k: v for k, v in load_file(path).items() if k.startswith("text_encoder")}


@pytest.mark.parametrize("model", ["builtin:tiny-sd", "builtin:tiny-sdxl"])
def test_text_encoder_adapter_is_trained_saved_and_reloaded(train_subject, subject_dir, tmp_path, model):
    path = train_subject(*flags(subject_dir, tmp_path / "run", model=model))
    info = difftune.read_adapter_info(path)
    encoders = {"builtin:tiny-sd": {"text_encoder"}, "builtin:tiny-sdxl": {"text_encoder", "text_encoder_2"}}
    assert set(info["text_encoders"]) == encoders[model]
    lora_b = {k: v for k, v in text_encoder_tensors(path).items() if "lora_B" in k}
    assert {k.split(".")[0] for k in lora_b} == {k.split(".")[0] for k in text_encoder_tensors(path)}
    for name in encoders[model]:
        layers = {k: int(k.split("layers.")[1].split(".")[0]) for k in lora_b if k.startswith(f"{name}.")}
        # B starts at zero, so it trained; SDXL reads the penultimate layer, whose successor
        # never gets a gradient (diffusers' encode_prompt does the same)
        last = max(layers.values()) if model == "builtin:tiny-sdxl" else None
        assert all(lora_b[k].abs().max() > 0 for k, i in layers.items() if i != last), name
    # difftune and diffusers read the same file into the same pipeline
    ours, theirs = load_pipeline(model), load_pipeline(model)
    difftune.load_adapter(ours, path)
    theirs.load_lora_weights(str(path.parent), weight_name="pytorch_lora_weights.safetensors")
    assert abs(generate(ours) - generate(theirs)).max() < 1e-5
    assert abs(generate(ours) - generate(load_pipeline(model))).max() > 1e-4


def test_text_encoder_learning_rate_is_its_own(train_subject, subject_dir, tmp_path):
    frozen_rate = train_subject(*flags(subject_dir, tmp_path / "a", "--text_encoder_lr", 1e-12))
    assert all(v.abs().max() < 1e-9 for k, v in text_encoder_tensors(frozen_rate).items() if "lora_B" in k)
    unet_b = [v for k, v in load_file(frozen_rate).items() if k.startswith("unet.") and "lora_B" in k]
    assert all(v.abs().max() > 1e-6 for v in unet_b)


@pytest.mark.parametrize("method", ["lora", "sara"])
def test_resume_with_text_encoder_is_bit_identical(train_subject, subject_dir, tmp_path, monkeypatch, method):
    from difftune.training import checkpointing

    run = ("--checkpointing_steps", 2, "--gradient_accumulation_steps", 2, "--random_flip")
    full = train_subject(*flags(subject_dir, tmp_path / "full", *run, method=method))
    original = checkpointing.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated interruption")

    with monkeypatch.context() as patch:
        patch.setattr(checkpointing, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_subject(*flags(subject_dir, tmp_path / "split", *run, method=method))
    resumed = train_subject(*flags(subject_dir, tmp_path / "split", *run, "--resume_from_checkpoint",
                                   "latest", method=method))
    a, b = load_file(full), load_file(resumed)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # a checkpoint written with the text encoder does not resume a run without it
    with pytest.raises(difftune.DifftuneError, match="train_text_encoder"):
        train_subject(*[f for f in flags(subject_dir, tmp_path / "split", *run, "--resume_from_checkpoint",
                                         "latest", "--max_train_steps", 6, method=method)
                        if f != "--train_text_encoder"])


@pytest.mark.parametrize(("extra", "message"), [
    (("--pre_compute_text_embeddings",), "--pre_compute_text_embeddings cannot be used with "
                                          "--train_text_encoder"),
    (("--text_encoder_lr", "0"), "--text_encoder_lr must be positive"),
    (("--pretrained_model_name_or_path", "builtin:tiny-sd3"), "--train_text_encoder supports SD 1.x/2.x "
                                                              "and SDXL"),
])
def test_bad_text_encoder_flags_are_refused_before_loading(train_subject, subject_dir, tmp_path, extra,
                                                          message):
    with pytest.raises(difftune.DifftuneError, match=message):
        train_subject(*flags(subject_dir, tmp_path / "bad"), *extra)
    assert not (tmp_path / "bad" / "adapter.safetensors").exists()


def test_text_encoder_lr_without_the_flag_is_refused(train_subject, subject_dir, tmp_path):
    bad = [f for f in flags(subject_dir, tmp_path / "bad") if f != "--train_text_encoder"]
    with pytest.raises(difftune.DifftuneError, match="--text_encoder_lr given without --train_text_encoder"):
        train_subject(*bad, "--text_encoder_lr", "1e-4")
