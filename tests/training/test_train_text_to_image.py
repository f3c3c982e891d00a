"""train_scripts/train_text_to_image.py end to end on the tiny offline pipelines: every method on every
trainable family with buckets and captions, exact resume with the moving average, presets."""

import json

import pytest
import torch
from conftest import METHOD_CASES, interrupt_after_first_checkpoint, make_style_images
from PIL import Image
from safetensors.torch import load_file

import difftune
import difftune.model_factory
from difftune.errors import DifftuneError
from difftune.families import FAMILIES
from difftune.training import checkpointing, recipes
from difftune.training.ema import AdapterEMA

# the image families (a video model trains on clips with train-subject: refused here)
TRAINABLE = [name for name, family in FAMILIES.items() if family.trainable and not family.video]


def method_options(method):
    """The method's contract options on the tiny models (tests/conftest.py), as trainer flags."""
    targets, options = METHOD_CASES[method]["contract"][0]
    flags = ["--targets", targets] if targets else []
    for name, value in options.items():
        flags += [f"--{name if name in ('rank', 'alpha') else f'{method}_{name}'}", value]
    return flags


def flags(data, out, family="sd", method="lora", steps=2, *extra):
    return ["--pretrained_model_name_or_path", f"builtin:tiny-{family}", "--train_data_dir", data,
            "--output_dir", out, "--adapter", method, *method_options(method), "--max_train_steps", steps,
            "--train_batch_size", 2, "--enable_bucket", "--caption_prefix", "zz style,",
            "--caption_dropout", 0.3, "--learning_rate", 1e-3, "--seed", 7, "--report_to", "none",
            "--skip_final_inference", *extra]


def initial_adapter(family, method, seed=7):
    """The adapter tensors the trainer starts from (it seeds before attaching)."""
    from accelerate.utils import set_seed

    pipe = difftune.model_factory.load_pipeline(f"builtin:tiny-{family}")
    denoiser, _ = difftune.api.find_denoiser(pipe)
    set_seed(seed)
    targets, options = METHOD_CASES[method]["contract"][0]
    difftune.add_adapter(denoiser, method, targets=targets, **options)
    return difftune.get_adapter(denoiser).adapter_state_dict()


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
@pytest.mark.parametrize("family", TRAINABLE)
def test_every_method_trains_on_every_family_with_buckets_and_captions(train_text_to_image, style_dir,
                                                                     tmp_path, capsys, family, method):
    out = tmp_path / "out"
    train_text_to_image(*flags(style_dir, out, family, method))
    printed = capsys.readouterr().out
    assert "aspect buckets (width x height: images): " in printed
    assert f"difftune text-to-image training | builtin:tiny-{family} ({family}" in printed
    assert "6 images" in printed and "2 steps x 2 images" in printed
    fresh = difftune.model_factory.load_pipeline(f"builtin:tiny-{family}")
    difftune.load_adapter(fresh, out / "adapter.safetensors")  # a valid file of this model
    trained = difftune.get_adapter(difftune.api.find_denoiser(fresh)[0]).adapter_state_dict()
    start = initial_adapter(family, method)
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # training moved the adapter
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text()) \
        if (out / "checkpoint-2").exists() else None
    assert state is None or state["caption_prefix"] == "zz style,"


def run_flags(data, out, family, method):
    # what carries state across steps: Adam moments, warm-up + cosine, flips, crops, accumulation, caption
    # dropout, buckets, the moving average
    return flags(data, out, family, method, 4, "--checkpointing_steps", 2, "--lr_scheduler", "cosine",
                 "--lr_warmup_steps", 1, "--random_flip", "--gradient_accumulation_steps", 2, "--use_ema",
                 "--ema_decay", 0.9)


RESUME_CASES = [("sd", method) for method in sorted(difftune.METHODS)] + \
    [(family, "lora") for family in TRAINABLE if family != "sd"]


@pytest.mark.parametrize(("family", "method"), RESUME_CASES)
def test_interrupted_and_resumed_run_ends_bit_identical(train_text_to_image, style_dir, tmp_path, monkeypatch,
                                                        family, method):
    full, split = tmp_path / "full", tmp_path / "split"
    train_text_to_image(*run_flags(style_dir, full, family, method))
    with monkeypatch.context() as patch:
        interrupt_after_first_checkpoint(patch)
        with pytest.raises(KeyboardInterrupt):
            train_text_to_image(*run_flags(style_dir, split, family, method))
    assert [p.name for p in checkpointing.list_checkpoints(split)] == ["checkpoint-2"]
    train_text_to_image(*run_flags(style_dir, split, family, method), "--resume_from_checkpoint", "latest")
    uninterrupted, resumed = load_file(full / "adapter.safetensors"), load_file(split / "adapter.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    for name in ("ema.safetensors", "optimizer.safetensors", "adapter.safetensors"):
        a = checkpointing.load_state(full / "checkpoint-4" / name) if name != "adapter.safetensors" else \
            load_file(full / "checkpoint-4" / name)
        b = checkpointing.load_state(split / "checkpoint-4" / name) if name != "adapter.safetensors" else \
            load_file(split / "checkpoint-4" / name)
        assert str(a) == str(b)


def test_the_saved_file_holds_the_average_and_validation_draws_every_prompt(train_text_to_image, style_dir,
                                                                          tmp_path):
    out = tmp_path / "out"
    train_text_to_image(*flags(style_dir, out, "sd", "lora", 3), "--use_ema", "--ema_decay", 0.5,
                        "--checkpointing_steps", 3, "--validation_prompt", "a red disc", "a blue square",
                        "--validation_steps", 3, "--num_validation_images", 2,
                        "--validation_inference_steps", 2)
    # the checkpoint holds the trained adapter and the average; the final file is the average
    pipe = difftune.model_factory.load_pipeline("builtin:tiny-sd")
    difftune.load_adapter(pipe, out / "checkpoint-3")
    ema = AdapterEMA([pipe.unet], decay=0.5)
    checkpointing.load_extra_state(out / "checkpoint-3", "ema", ema)
    raw = {k: v.clone() for k, v in difftune.get_adapter(pipe.unet).adapter_state_dict().items()}
    with ema.applied():
        averaged = {k: v.clone() for k, v in difftune.get_adapter(pipe.unet).adapter_state_dict().items()}
    final = difftune.model_factory.load_pipeline("builtin:tiny-sd")
    difftune.load_adapter(final, out / "adapter.safetensors")
    saved = difftune.get_adapter(final.unet).adapter_state_dict()
    assert saved.keys() == averaged.keys() and all(torch.equal(saved[k], averaged[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)
    grid = Image.open(out / "validation" / "step-000003.png")
    assert grid.size == (2 * 64, 2 * 64)  # a row per prompt, an image per column
    rows = torch.tensor(list(grid.getdata()), dtype=torch.float32).reshape(128, 128, 3)
    assert not torch.equal(rows[:64], rows[64:])
    card = (out / "README.md").read_text()
    assert "fine-tune on a captioned dataset" in card and "caption prefix | `zz style,`" in card


def test_bad_examples_and_bucket_flags_stop_before_the_model_loads(train_text_to_image, tmp_path,
                                                                   monkeypatch):
    data = make_style_images(tmp_path / "s", sizes=((32, 32),) * 3)
    (data / "0.png").write_bytes(b"not an image")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "1.png", "text": "a"}) + "\n")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", must_not_load)
    with pytest.raises(DifftuneError, match=r"2 bad example\(s\): 0.png: unreadable .*; 2.png: no caption"):
        train_text_to_image(*flags(data, tmp_path / "o"))
    multiple = difftune.model_factory.describe_model("builtin:tiny-sd").size_multiple
    with pytest.raises(DifftuneError, match=f"--bucket_step must be a positive multiple of {multiple} "):
        train_text_to_image(*flags(data, tmp_path / "o"), "--bucket_step", 3)
    with pytest.raises(DifftuneError, match="--bucket_min_side given without --enable_bucket"):
        train_text_to_image(*[f for f in flags(data, tmp_path / "o") if f != "--enable_bucket"],
                            "--bucket_min_side", 32)


def test_a_video_model_is_refused_before_loading(train_text_to_image, style_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(difftune.model_factory, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    for name in [name for name, family in FAMILIES.items() if family.trainable and family.video]:
        refusal = f"builtin:tiny-{name} is a video model .*difftune train-subject"
        with pytest.raises(DifftuneError, match=refusal):
            train_text_to_image(*flags(style_dir, tmp_path / "o", name))


def test_range_checks_and_kohya_spellings_of_the_dataset_flags(train_text_to_image, style_dir):
    """The dataset trainer's own flags are settings fields: their range checks refuse in one line
    while parsing, and kohya's / diffusers' spellings fill the same settings."""
    parse = train_text_to_image.module.parse_args
    refused = [("--caption_dropout", 1.0, r"--caption_dropout must be in \[0, 1\), got 1.0"),
               ("--ema_decay", 1.0, r"--ema_decay must be in \(0, 1\), got 1.0"),
               ("--max_train_samples", 0, "--max_train_samples must be at least 1, got 0")]
    for flag, value, message in refused:
        with pytest.raises(DifftuneError, match=message):
            parse(["--train_data_dir", str(style_dir), flag, str(value)])
    args = parse(["--train_data_dir", str(style_dir), "--enable_bucket", "--min_bucket_reso", "32",
                  "--bucket_reso_steps", "16", "--caption_dropout_rate", "0.1"])
    assert (args.bucket_min_side, args.bucket_step, args.caption_dropout) == (32, 16, 0.1)
    args = parse(["--train_data_dir", str(style_dir), "--proportion_empty_prompts", "0.2"])
    assert args.caption_dropout == 0.2


@pytest.mark.parametrize("preset", sorted(recipes.DATASET_PRESETS))
def test_each_preset_trains_its_family_tiny_model_on_a_style_folder(train_text_to_image, style_dir, tmp_path,
                                                                    capsys, preset):
    """--preset on a fake style folder; the model, size and precision given on the command line win
    (a tiny model on a CPU), everything else comes from the preset."""
    family = recipes.DATASET_PRESETS[preset]["family"]
    out = tmp_path / "out"
    train_text_to_image("--preset", preset, "--pretrained_model_name_or_path", f"builtin:tiny-{family}",
                        "--resolution", 64, "--mixed_precision", "no", "--max_train_steps", 2,
                        "--train_batch_size", 1, "--train_data_dir", style_dir, "--output_dir", out,
                        "--report_to", "none", "--seed", 0, "--skip_final_inference")
    printed = capsys.readouterr().out
    applied = printed.split(f"preset {preset}: ", 1)[1].splitlines()[0]
    assert "--learning_rate 0.0001" in applied and "--lr_scheduler cosine" in applied
    assert "--enable_bucket True" in applied and "--pretrained_model_name_or_path" not in applied
    assert "aspect buckets" in printed and "| lr 0.0001 |" in printed
    assert (out / "adapter.safetensors").is_file()


def test_trains_on_top_of_frozen_adapters(train_text_to_image, style_dir, tmp_path, capsys):
    from conftest import build, randomize_adapter

    pipe = build("sd")
    difftune.add_adapter(pipe, "svfit", "attn", rank=2)
    randomize_adapter(pipe, std=0.01)
    base = difftune.save_adapter(pipe, tmp_path / "pose.safetensors")
    out = tmp_path / "run"
    train_text_to_image(*flags(style_dir, out, "sd", "lora", 2, "--base_adapter", f"{base}:0.6", "--use_ema"))
    info = difftune.read_adapter_info(out / "adapter.safetensors")
    assert info["method"] == "lora"
    records = [(r["method"], r["weight"], r["source"]) for r in info["base_adapters"]]
    assert records == [("svfit", 0.6, str(base))]
    assert "| on top of frozen pose.safetensors x0.6" in capsys.readouterr().out  # the banner says so
