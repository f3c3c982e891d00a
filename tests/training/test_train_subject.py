"""train_scripts/train_subject.py end to end on the tiny offline pipelines."""

import glob
import json

import numpy as np
import pytest
import torch
from conftest import make_subject_images
from PIL import Image
from safetensors.torch import load_file

import difftune
import difftune.model_factory
from difftune.errors import DifftuneError
from difftune.model_factory import load_pipeline
from difftune.sampling import GenerationSettings, generate_images, image_grid
from difftune.training import checkpointing

MODELS = {"sd": "builtin:tiny-sd", "sdxl": "builtin:tiny-sdxl", "sd3": "builtin:tiny-sd3",
          "flux": "builtin:tiny-flux"}
QUIET = ["--report_to", "none", "--seed", "0"]


def flags(subject_dir, out, model="builtin:tiny-sd", steps=2, *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--max_train_steps", steps,
            *extra]


def draw(pipe, prompt, count, seed=0):
    """The trainer's samples (2 steps, 64 px, the pipeline's guidance, one image per call)."""
    settings = GenerationSettings(count, seed, num_inference_steps=2, guidance_scale=None, height=64,
                                  width=64, batch_size=1)
    return generate_images(pipe, [prompt], settings, show_progress=False)[0]


def samples_from_saved_file(model, folder, prompt, count, seed=0):
    fresh = load_pipeline(model)
    difftune.load_adapter(fresh, folder / "adapter.safetensors")
    return draw(fresh, prompt, count, seed)


def test_run_writes_adapter_samples_logs_checkpoints_and_card(train_subject, subject_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 4), "--rank", 2, "--learning_rate", 5e-3,
                  "--seed", 0, "--validation_prompt", "a sks disc", "--validation_steps", 2,
                  "--num_validation_images", 2, "--validation_inference_steps", 2, "--checkpointing_steps", 2,
                  "--checkpoints_total_limit", 1)
    captured = capsys.readouterr()

    reference = load_pipeline("builtin:tiny-sd")
    difftune.add_adapter(reference.unet, "lora", rank=2)
    trainable = difftune.count_trainable_parameters(reference.unet)
    assert (f"difftune subject training | builtin:tiny-sd (sd, 64px, no) | lora on attn: 48 layers, "
            f"{trainable:,} trainable parameters | 3 instance images | 4 steps x 1 images") in captured.out
    assert "training: 100%" in captured.err and "loss=" in captured.err and "lr=" in captured.err
    assert "it/s" in captured.err or "s/it" in captured.err

    for name in ("adapter.safetensors", "pytorch_lora_weights.safetensors", "README.md", "samples.png",
                 "validation/step-000002.png", "validation/step-000004.png",
                 "checkpoint-4/adapter.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint-2").exists()  # --checkpoints_total_limit 1

    # the final grid was sampled from a fresh pipeline holding the saved file
    again = samples_from_saved_file("builtin:tiny-sd", out, "a sks disc", 2)
    assert np.array_equal(np.asarray(Image.open(out / "samples.png")), np.asarray(image_grid(again)))
    base = draw(load_pipeline("builtin:tiny-sd"), "a sks disc", 2)
    assert not np.array_equal(np.asarray(image_grid(base)), np.asarray(image_grid(again)))

    card = (out / "README.md").read_text()
    for fact in ("base_model: \"builtin:tiny-sd\"", "| method | `lora` |", '"rank": 2',
                 "| optimizer steps | 4 |",
                 f"| trainable parameters | {trainable:,} |", "![sample](samples.png)"):
        assert fact in card

    info = difftune.read_adapter_info(out / "adapter.safetensors")
    assert info["method"] == "lora" and info["base_model"] == "builtin:tiny-sd"
    diffusers_copy = (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert diffusers_copy == (out / "adapter.safetensors").read_bytes()


def test_training_is_logged_to_tensorboard(train_subject, subject_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 2), "--seed", 0,
                  "--validation_prompt", "a disc",
                  "--validation_steps", 1, "--num_validation_images", 1, "--validation_inference_steps", 1)
    (events,) = glob.glob(str(out / "logs" / "difftune-subject" / "events.out.tfevents.*"))
    log = EventAccumulator(events, size_guidance={"images": 0, "scalars": 0})
    log.Reload()
    assert [e.step for e in log.Scalars("loss")] == [1, 2]
    assert all(np.isfinite(e.value) for e in log.Scalars("loss"))
    assert [e.step for e in log.Scalars("lr")] == [1, 2]
    assert {"validation", "final"} <= {tag.split("/")[0] for tag in log.Tags()["images"]}


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_other_families_train_and_their_files_load_in_diffusers(train_subject, subject_dir, tmp_path, family):
    out = tmp_path / family
    model = MODELS[family]
    train_subject(*flags(subject_dir, out, model, 2), *QUIET, "--learning_rate", 1e-2,
                  "--num_validation_images", 1, "--validation_inference_steps", 2)
    ours = samples_from_saved_file(model, out, "a photo of sks disc", 1)
    assert np.array_equal(np.asarray(Image.open(out / "samples.png")), np.asarray(ours[0]))
    theirs = load_pipeline(model)
    theirs.load_lora_weights(out)  # pytorch_lora_weights.safetensors, diffusers' default name
    with_diffusers = draw(theirs, "a photo of sks disc", 1)
    assert np.abs(np.asarray(with_diffusers[0], dtype=int) - np.asarray(ours[0], dtype=int)).max() <= 1


def test_bf16_base_weights_with_fp32_trainable_parameters(train_subject, subject_dir, tmp_path, monkeypatch):
    loaded = []
    original = train_subject.module.load_pipeline

    def recording(*args, **kwargs):
        loaded.append(original(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", recording)  # what the trainer loads through
    out = tmp_path / "bf16"
    train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 2), *QUIET, "--mixed_precision", "bf16",
                  "--skip_final_inference", "--checkpointing_steps", 2)
    unet = loaded[0].unet
    trainable = dict(difftune.named_trainable_parameters(unet))
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in unet.named_parameters() if n not in trainable]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert loaded[0].vae.dtype == torch.float32 and loaded[0].text_encoder.dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in trainable.values())
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    optimizer = checkpointing.load_state(out / "checkpoint-2" / "optimizer.safetensors")
    assert all(v["exp_avg"].dtype == torch.float32 for v in optimizer["state"].values())


def test_gradient_checkpointing_gives_the_same_adapter(train_subject, subject_dir, tmp_path):
    from safetensors.torch import load_file

    plain, checkpointed = tmp_path / "plain", tmp_path / "ckpt"
    train_subject(*flags(subject_dir, plain, "builtin:tiny-sd", 2), *QUIET, "--skip_final_inference")
    train_subject(*flags(subject_dir, checkpointed, "builtin:tiny-sd", 2), *QUIET, "--skip_final_inference",
                  "--gradient_checkpointing")
    a, b = load_file(plain / "adapter.safetensors"), load_file(checkpointed / "adapter.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # it did train (B starts at 0)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)


# --- bad input: a clear message before the model is loaded -------------------------------------

def _bad_inputs(tmp_path, subject_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))

    def subject_with(name, **files):
        folder = make_subject_images(tmp_path / name)
        for file_name, data in files.items():
            (folder / file_name.replace("_dot_", ".")).write_bytes(data)
        return folder

    listed = subject_with("listed",
                          metadata_dot_jsonl=b'{"file_name": "subject_0.png", "text": "a"}\n[1, 2, 3]\n')
    latin = subject_with("latin", metadata_dot_jsonl='{"file_name": "subject_0.png", "text": "caf\xe9"}'
                         .encode("latin-1"))
    sidecar = subject_with("sidecar", subject_1_dot_txt="caf\xe9 sks".encode("latin-1"))
    text_image = tmp_path / "text_image"
    text_image.mkdir()
    (text_image / "photo.png").write_text("not an image")
    config = tmp_path / "config.yaml"
    config.write_bytes("instance_prompt: caf\xe9".encode("latin-1"))
    class_file = tmp_path / "class_images.png"
    class_file.write_bytes(b"a file")
    base = ["--instance_data_dir", subject_dir, "--instance_prompt", "a sks disc",
            "--pretrained_model_name_or_path", "builtin:tiny-sd", "--output_dir", tmp_path / "o"]
    return {
        "missing dir": ([*base, "--instance_data_dir", tmp_path / "nope"],
                        r"--instance_data_dir .*nope: no such"),
        "empty dir": ([*base, "--instance_data_dir", empty], "empty: no images found"),
        "corrupt image": ([*base, "--instance_data_dir", corrupt], r"cannot read image .*photo.jpg"),
        "no prompt": ([a for a in base if a != "--instance_prompt" and a != "a sks disc"],
                      "--instance_prompt is required"),
        "unknown target": ([*base, "--targets", "attn", "to_nothing"],
                           "target 'to_nothing' matched no layer"),
        "bad option value": ([*base, "--rank", "0"], "'rank' must be a positive integer"),
        "prior without class": ([*base, "--with_prior_preservation"],
                                "--with_prior_preservation needs --class_data_dir and --class_prompt"),
        "class without prior": ([*base, "--class_prompt", "a disc"],
                                "--class_prompt given without --with_prior_preservation"),
        "flow flag on sd": ([*base, "--weighting_scheme", "cosmap"], "--weighting_scheme only apply to SD3"),
        "snr on sd3": ([*base, "--pretrained_model_name_or_path", "builtin:tiny-sd3", "--snr_gamma", "5"],
                       "--snr_gamma only apply to SD 1.x/2.x and SDXL"),
        "resolution": ([*base, "--resolution", "63"],
                       "--resolution must be a multiple of 8 for builtin:tiny-sd"),
        "resolution the pipeline refuses": ([*base, "--resolution", "100"],
                                            "--resolution must be a multiple of 8 for builtin:tiny-sd"),
        "metadata line not an object": ([*base, "--instance_data_dir", listed],
                                        r"metadata.jsonl line 2 must be a JSON object .*got \[1, 2, 3\]"),
        "metadata not utf-8": ([*base, "--instance_data_dir", latin],
                               r"--instance_data_dir .*latin/metadata.jsonl: not UTF-8 text"),
        "caption not utf-8": ([*base, "--instance_data_dir", sidecar],
                              r"--instance_data_dir .*sidecar/subject_1.txt: not UTF-8 text"),
        "config not utf-8": ([*base, "--config", config], r"--config .*config.yaml: not UTF-8 text"),
        "negative seed": ([*base, "--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
        "class dir is a file": ([*base, "--with_prior_preservation", "--class_prompt", "a disc",
                                 "--class_data_dir", class_file],
                                r"--class_data_dir .*class_images.png: is a file, not a folder"),
        "recipe, missing dir": ([*base, "--pretrained_model_name_or_path", "builtin:embedded",
                                 "--instance_data_dir", tmp_path / "nope"],
                                r"--instance_data_dir .*nope: no such"),
        "recipe, text as image": ([*base, "--pretrained_model_name_or_path", "builtin:embedded",
                                   "--instance_data_dir", text_image], r"cannot read image .*photo.png"),
        "unsupported family": ([*base, "--pretrained_model_name_or_path", other],
                               "unsupported base model family: KandinskyV22Pipeline"),
        "unknown builtin": ([*base, "--pretrained_model_name_or_path", "builtin:huge"],
                            "unknown built-in model 'builtin:huge'"),
        "resume missing": ([*base, "--resume_from_checkpoint", tmp_path / "nowhere"], "no such checkpoint"),
        "nan learning rate": ([*base, "--learning_rate", "nan"], "--learning_rate must be a finite number"),
        "inf learning rate": ([*base, "--learning_rate", "inf"], "--learning_rate must be a finite number"),
        "adam beta1": ([*base, "--adam_beta1", "2"], r"--adam_beta1 must be in \[0, 1\)"),
        "adam epsilon": ([*base, "--adam_epsilon", "-1"], "--adam_epsilon must be positive"),
        "output dir is a file": ([*base, "--output_dir", corrupt / "photo.jpg"],
                                 r"--output_dir .*photo.jpg is a file, not a folder"),
        "output dir not writable": ([*base, "--output_dir", "/proc/self/difftune-out"],
                                    r"--output_dir /proc/self/difftune-out is not writable: "),
        "adapter too large": ([*base, "--rank", "10000000"],
                              r"the lora adapter \(--adapter lora and its options\) trains "
                              r"35,200,000,000 parameters: with their gradients and AdamW state that is at "
                              r"least 524.5 GiB, plus 0.00 GiB to encode one image at --resolution 64; this "
                              r"machine's (cpu|cuda) memory is .* GiB: lower --rank"),
        "absurd resolution": ([*base, "--resolution", "100000"],
                              r"--resolution 100000 needs at least 2\d\d\d.\d GiB to encode one image, this "
                              r"machine's (cpu|cuda) memory is .* GiB; use a smaller --resolution \(the "
                              r"model's own is 64\)"),
    }


BAD_INPUT_CASES = ["missing dir", "empty dir", "corrupt image", "no prompt", "unknown target",
                   "bad option value", "prior without class", "class without prior", "flow flag on sd",
                   "snr on sd3", "resolution", "unsupported family", "unknown builtin", "resume missing",
                   "nan learning rate", "inf learning rate", "adam beta1", "adam epsilon",
                   "output dir is a file", "output dir not writable", "absurd resolution",
                   "adapter too large", "resolution the pipeline refuses", "metadata line not an object",
                   "metadata not utf-8", "caption not utf-8", "config not utf-8", "negative seed",
                   "class dir is a file", "recipe, missing dir", "recipe, text as image"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_refused_before_loading_the_model(train_subject, subject_dir, tmp_path, monkeypatch,
                                                       case):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", must_not_load)
    monkeypatch.setattr(train_subject.module, "load_pipeline", must_not_load)  # class-image generation
    argv, message = _bad_inputs(tmp_path, subject_dir)[case]
    with pytest.raises(DifftuneError, match=message):
        train_subject(*argv)


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_a_diverging_run_stops_at_the_first_non_finite_step_and_writes_no_nan(train_subject, subject_dir,
                                                                              tmp_path, clip):
    """A LoRA scaled by 64 at learning rate 1 blows up within a few steps: the run must stop with one
    line naming the step and what to change, and leave no adapter or checkpoint holding NaN or inf."""
    out = tmp_path / "o"
    with pytest.raises(DifftuneError, match=r"training stopped at step \d+: the gradient norm \(inf\) is not "
                                            r"finite .*Lower --learning_rate .*--mixed_precision no"):
        train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 10), *QUIET, "--learning_rate", 1,
                      "--rank", 64, "--alpha", 4096, "--max_grad_norm", clip, "--checkpointing_steps", 1,
                      "--skip_final_inference")
    assert not (out / "adapter.safetensors").exists()
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert list(out.glob("checkpoint-*/adapter.safetensors"))
    for path in out.glob("checkpoint-*/adapter.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def test_a_method_hook_that_leaves_a_non_finite_parameter_stops_training(train_subject, subject_dir,
                                                                         tmp_path, monkeypatch):
    from difftune.training import loop

    original = loop.attach_trainable_adapter

    def with_broken_hook(denoiser, *args):
        adapter = original(denoiser, *args)

        def after_optimizer_step(step, *rest):
            if step == 2:
                with torch.no_grad():
                    difftune.trainable_parameters(denoiser)[0].fill_(float("inf"))

        adapter.after_optimizer_step = after_optimizer_step
        return adapter

    monkeypatch.setattr(loop, "attach_trainable_adapter", with_broken_hook)
    out = tmp_path / "o"
    with pytest.raises(DifftuneError, match="training stopped at step 2: an adapter parameter after the "
                                            "update is not finite"):
        train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 3), *QUIET, "--checkpointing_steps", 1,
                      "--skip_final_inference")
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_a_non_finite_gradient_stops_training(train_subject, subject_dir, tmp_path, monkeypatch, clip):
    from difftune.training import loop

    original = loop.attach_trainable_adapter

    def with_nan_gradient(denoiser, *args):
        adapter = original(denoiser, *args)
        difftune.trainable_parameters(denoiser)[0].register_hook(lambda grad: grad * float("nan"))
        return adapter

    monkeypatch.setattr(loop, "attach_trainable_adapter", with_nan_gradient)
    out = tmp_path / "o"
    with pytest.raises(DifftuneError, match=r"training stopped at step 1: the gradient norm \(nan\) is not "
                                            "finite"):
        train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 2), *QUIET, "--max_grad_norm", clip,
                      "--skip_final_inference")
    assert not (out / "adapter.safetensors").exists()


def test_a_non_finite_loss_stops_training_before_the_update(train_subject, subject_dir, tmp_path,
                                                            monkeypatch):
    calls = []
    original = train_subject.module.subject_loss

    def loss_nan_at_third_step(*args):
        calls.append(1)
        loss = original(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_subject.module, "subject_loss", loss_nan_at_third_step)
    out = tmp_path / "o"
    with pytest.raises(DifftuneError, match=r"training stopped at step 3: the loss \(nan\) is not finite"):
        train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 4), *QUIET, "--checkpointing_steps", 1,
                      "--skip_final_inference")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "adapter.safetensors").exists()


def test_a_read_only_output_dir_is_refused_before_loading(train_subject, subject_dir, tmp_path, monkeypatch):
    import os

    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the write test fail as it would for a user
        from difftune import io as difftune_io

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(difftune_io.tempfile, "mkstemp", denied)
    monkeypatch.setattr(difftune.model_factory, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DifftuneError, match=r"--output_dir .*read-only is not writable: Permission denied"):
        train_subject(*flags(subject_dir, out), *QUIET)


def test_text_encoder_or_token_training_under_several_processes_is_refused_before_loading(
        train_subject, subject_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from difftune.training import loop

    monkeypatch.setattr(loop, "create_accelerator", lambda *a, **k: SimpleNamespace(num_processes=2))
    monkeypatch.setattr(loop, "load_base_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    for flag in ("--train_text_encoder", "--train_token_embedding"):
        with pytest.raises(DifftuneError, match=f"{flag} runs in one process for now"):
            train_subject(*flags(subject_dir, tmp_path / flag.strip("-")), *QUIET, flag)


def test_unknown_adapter_lists_the_methods(train_subject, subject_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_subject(*flags(subject_dir, tmp_path / "o"), "--adapter", "lokr")
    err = capsys.readouterr().err
    assert "argument --adapter: invalid choice: 'lokr'" in err and "lora" in err


def test_warnings_for_skipped_files_and_small_images(train_subject, subject_dir, tmp_path):
    (subject_dir / "notes.txt").write_text("not a caption: no notes.png")
    Image.new("RGB", (40, 40), "blue").save(subject_dir / "tiny.png")
    with pytest.warns(UserWarning) as caught:
        train_subject(*flags(subject_dir, tmp_path / "o", "builtin:tiny-sd", 1), *QUIET,
                      "--skip_final_inference")
    messages = " ".join(str(w.message) for w in caught)
    assert "not images: notes.txt" in messages
    assert "smaller than --resolution 64" in messages and "tiny.png (40x40)" in messages


def test_resume_refuses_a_checkpoint_of_another_configuration(train_subject, subject_dir, tmp_path):
    out = tmp_path / "o"
    train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 1), *QUIET, "--skip_final_inference",
                  "--checkpointing_steps", 1)
    with pytest.raises(DifftuneError, match=r"it was trained with adapter_options \{\}, this run asks for "
                                            r"\{'rank': 8\}"):
        train_subject(*flags(subject_dir, out, "builtin:tiny-sd", 2), *QUIET, "--rank", 8,
                      "--resume_from_checkpoint", "latest")


def test_subject_loss_adds_the_weighted_prior_term(train_subject):
    per_example = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_prior = torch.tensor([False, False, True, True])
    loss = train_subject.module.subject_loss(per_example, is_prior, 0.5)
    assert loss.item() == pytest.approx((1 + 3) / 2 + 0.5 * (10 + 20) / 2)
    assert train_subject.module.subject_loss(per_example[:2], is_prior[:2], 0.5).item() == 2.0


def test_prior_preservation_generates_missing_class_images_once(train_subject, subject_dir, tmp_path, capsys):
    from difftune.training.data import RandomDomain, sample_generator

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), "green").save(class_dir / "mine.png")  # a user's own class image stays
    config = tmp_path / "run.yaml"  # options from a config file; flags still override it
    config.write_text(
        "pretrained_model_name_or_path: builtin:tiny-sd\n"
        f"instance_data_dir: {subject_dir}\n"
        "instance_prompt: a photo of sks disc\n"
        "with_prior_preservation: true\n"
        f"class_data_dir: {class_dir}\n"
        "class_prompt: a photo of a disc\n"
        "num_class_images: 3\n"
        "class_inference_steps: 2\n"
        "sample_batch_size: 2\n"
        "max_train_steps: 5\n"
        "report_to: none\n"
        "skip_final_inference: true\n"
        "seed: 4\n")
    out = tmp_path / "out"
    train_subject("--config", config, "--output_dir", out, "--max_train_steps", 2)
    captured = capsys.readouterr()
    assert "generating class images (2 missing): 100%" in captured.err
    assert "3 instance images + 3 class images | 2 steps" in captured.out
    generated = sorted(class_dir.glob("class-*.png"))
    assert [p.name for p in generated] == ["class-00000.png", "class-00001.png"]
    # image k is the base pipeline's sample for the class prompt from generator (seed, k)
    base = load_pipeline("builtin:tiny-sd")
    for k, path in enumerate(generated):
        expected = base("a photo of a disc", num_inference_steps=2, height=64, width=64,
                        generator=sample_generator(4, RandomDomain.CLASS_IMAGE, k)).images[0]
        # (generated two at a time there: batched convolutions round a little differently)
        difference = np.abs(np.asarray(Image.open(path), dtype=int) - np.asarray(expected, dtype=int))
        assert difference.max() <= 2 and difference.mean() < 0.05
    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}

    train_subject("--config", config, "--output_dir", tmp_path / "again", "--max_train_steps", 1)
    assert "generating class images" not in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps


def test_method_training_hooks_are_called_in_order(train_subject, subject_dir, tmp_path, monkeypatch):
    """A method sees: loss + regularization → backward → before_optimizer_step → clip → step →
    after_optimizer_step; its learning-rate rule, and its training state across a resume."""
    from accelerate import Accelerator

    from difftune.tuners.lora import LoraAdapter

    calls = []

    class Recording(LoraAdapter):
        method = "recording"

        def default_learning_rate(self):
            return 0.0123

        def regularization_loss(self):
            calls.append("regularization")
            return 0.0 * sum(p.sum() for _, p in self.named_trainable_parameters())

        def before_optimizer_step(self, step, max_steps):
            grads = [p.grad for _, p in self.named_trainable_parameters()]
            calls.append(("before", step, max_steps, all(g is not None for g in grads)))

        def after_optimizer_step(self, step, max_steps, optimizer):
            calls.append(("after", step, optimizer.param_groups[0]["lr"]))

        def training_state(self):
            return {"calls_so_far": torch.tensor(len(calls)), "note": "kept"}

        def load_training_state(self, state):
            calls.append(("load_training_state", state["note"], int(state["calls_so_far"])))

    monkeypatch.setitem(difftune.METHODS, "recording", Recording)
    original_clip, original_step = Accelerator.clip_grad_norm_, torch.optim.AdamW.step
    original_load = torch.optim.AdamW.load_state_dict
    monkeypatch.setattr(Accelerator, "clip_grad_norm_",
                        lambda self, *a, **k: calls.append("clip") or original_clip(self, *a, **k))
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: calls.append("step") or
                        original_step(self, *a, **k))
    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", lambda self, *a, **k: calls.append(
        "load_optimizer") or original_load(self, *a, **k))
    out = tmp_path / "hooks"
    common = [*flags(subject_dir, out, "builtin:tiny-sd", 2), *QUIET, "--adapter", "recording",
              "--gradient_accumulation_steps", 2, "--skip_final_inference", "--checkpointing_steps", 1]
    train_subject(*common)
    recorded_when_saved = len(calls)
    steps = [c for c in calls if c != "load_optimizer"]  # accelerate reloads the state once when preparing
    assert steps == ["regularization", "regularization", ("before", 0, 2, True), "clip", "step",
                     ("after", 1, 0.0123), "regularization", "regularization", ("before", 1, 2, True), "clip",
                     "step", ("after", 2, 0.0123)]
    calls.clear()
    train_subject(*common[:-1], 3, "--resume_from_checkpoint", "latest", "--max_train_steps", 3)
    assert calls[0] == ("load_training_state", "kept", recorded_when_saved)
    resumed = len(calls) - calls[::-1].index("load_optimizer") - 1  # the checkpoint's optimizer state
    assert resumed > 0 and all(c == "load_optimizer" for c in calls[1:resumed + 1])
    assert calls[resumed + 1:] == ["regularization", "regularization", ("before", 2, 3, True), "clip", "step",
                                   ("after", 3, 0.0123)]


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
def test_compile_trains_every_method_like_eager(train_subject, subject_dir, tmp_path, method, monkeypatch):
    """--compile on the tiny UNet, every registered method: dynamo traces the denoiser (aot_eager:
    the forward and backward graphs without code generation, which takes minutes on a CPU) and the
    adapter comes out as in eager mode. SaRA's trained layers run eagerly inside (graph breaks)."""
    import torch._dynamo

    from difftune.training import loop

    compiled = []
    original = loop.compile_denoiser

    def recording(denoiser, backend):
        compiled.append(original(denoiser, backend))
        return compiled[-1]

    monkeypatch.setattr(loop, "compile_denoiser", recording)
    eager, traced = tmp_path / "eager", tmp_path / "compiled"
    common = ("--adapter", method, *QUIET, "--skip_final_inference", "--learning_rate", "1e-3")
    train_subject(*flags(subject_dir, eager, "builtin:tiny-sd", 2), *common)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    train_subject(*flags(subject_dir, traced, "builtin:tiny-sd", 2), *common, "--compile",
                  "--compile_backend", "aot_eager")
    assert compiled == ["regional"]  # the SD UNet lists BasicTransformerBlock as its repeated block
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    a, b = load_file(eager / "adapter.safetensors"), load_file(traced / "adapter.safetensors")
    assert a.keys() == b.keys()
    # compiled kernels round differently, and Adam's g/(√v + ε) turns that into visible differences
    # where a gradient is at rounding level: compare against the size of the whole update
    scale = max(float(t.abs().max()) for t in a.values() if t.is_floating_point())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=0.01 * scale)
    trained = [k for k in a if a[k].is_floating_point() and a[k].abs().sum() > 0]
    assert trained, "the adapter did not train"
    torch._dynamo.reset()


def test_compile_backend_is_checked_before_loading(train_subject, subject_dir, tmp_path):
    with pytest.raises(DifftuneError, match="--compile_backend 'nope' is not a torch.compile backend"):
        train_subject(*flags(subject_dir, tmp_path / "out", "builtin:tiny-sd", 1), *QUIET, "--compile",
                      "--compile_backend", "nope")
@pytest.mark.parametrize(("method", "options"), [
    ("lora", {"rank": 3}), ("sara", {"budget": 0.05}), ("sara", {"budget": 0.05, "include_bias_norm": True}),
    ("svfit", {"rank": 3}), ("tlora", {"residual": "lora"})])
def test_the_weightless_count_is_what_attaching_trains(method, options):
    """Counted on a weightless model before loading; checked against the real attach."""
    from difftune.api import AdapterSpec
    from difftune.model_factory import build_denoiser_on_meta, describe_model

    info = describe_model("builtin:tiny-sd")
    spec = AdapterSpec(method, "all" if method == "sara" else None, options)
    count = spec.weightless_parameter_count(build_denoiser_on_meta(info.denoiser_config, info.denoiser_class))
    pipe = load_pipeline("builtin:tiny-sd")
    spec.attach(pipe.unet)
    assert count == difftune.count_trainable_parameters(pipe.unet)


def test_an_adapter_too_large_for_the_memory_is_refused_before_loading(train_subject, subject_dir, tmp_path,
                                                                       monkeypatch):
    from difftune import machine

    monkeypatch.setattr(machine, "memory_bytes", lambda device_type="cpu": 4 * 2**30)
    monkeypatch.setattr(difftune.model_factory, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DifftuneError, match=r"trains 352,000,000 parameters: .* at least 5.2 GiB, plus "
                                            r"0.00 GiB .*; this machine's (cpu|cuda) memory is 4.0 GiB"):
        train_subject(*flags(subject_dir, tmp_path / "o"), *QUIET, "--rank", 100000)
    with pytest.raises(DifftuneError, match=r"the sara adapter .* trains [\d,]+ parameters"):
        train_subject(*flags(subject_dir, tmp_path / "o"), *QUIET, "--adapter", "sara", "--targets", "all",
                      "--sara_budget", 0.99, "--resolution", 4000)  # with the image: just over
