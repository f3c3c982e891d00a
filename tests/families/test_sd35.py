"""SD3.5 layout (MMDiT-X: dual-attention layers with a second self-attention ``attn2``, and
RMS QK-norm) on a tiny config: the SD3 family attaches, trains, saves and reloads every method."""

import numpy as np
import pytest
import torch
from conftest import denoise, denoiser_inputs, generate, method_cases, randomize_adapter

import difftune
from difftune.families import LossOptions, TrainingBatch, training_family
from difftune.families.sd3 import SD3Family
from difftune.targeting import resolve_targets


def tiny_sd35_pipeline(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    pipe = SD3Family.build_tiny(seed)
    torch.manual_seed(seed + 100)
    config = {**SD3Family.tiny_denoiser_config, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
    pipe.transformer = SD3Transformer2DModel(**config)
    return pipe


def test_sd35_attention_preset_covers_the_dual_attention_and_leaves_qk_norms():
    model = tiny_sd35_pipeline().transformer
    names = set(resolve_targets(model, "attn"))
    assert {f"transformer_blocks.0.attn2.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")} <= names
    assert not any("attn2" in n for n in names if n.startswith("transformer_blocks.1."))  # layer 0 only
    assert not any("norm_q" in n or "norm_k" in n for n in names)
    assert any("norm_q" in n for n, _ in model.named_modules())


@pytest.mark.parametrize(("method", "targets", "options"), method_cases("contract"))
def test_sd35_methods_train_merge_save_and_reload(method, targets, options, tmp_path):
    pipe = tiny_sd35_pipeline()
    inputs = denoiser_inputs(pipe)
    base = denoise(pipe, inputs)
    difftune.add_adapter(pipe, method, targets=targets, **options)
    torch.testing.assert_close(denoise(pipe, inputs), base, atol=1e-6, rtol=0)

    family = training_family(pipe, torch.device("cpu"), LossOptions())
    assert isinstance(family, SD3Family)
    randomize_adapter(pipe, std=0.05)
    latents = torch.randn(1, 4, 32, 32)
    noisy = family.add_noise(latents, torch.randn_like(latents), [torch.Generator().manual_seed(0)])
    batch = TrainingBatch(None, family.encode_prompts(["a sks dog"]), None, None, None, [])
    family.per_example_loss(family.predict(pipe.transformer, noisy, batch), noisy).mean().backward()
    # the last block is context-pre-only: its context query feeds nothing (as on SD3 itself)
    dead = f"transformer_blocks.{len(pipe.transformer.transformer_blocks) - 1}.attn.add_q_proj"
    params = difftune.named_trainable_parameters(pipe)
    assert params
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in params if not n.startswith(dead))

    adapted = denoise(pipe, inputs)
    assert (adapted - base).abs().max() > 1e-4
    path = difftune.save_adapter(pipe, tmp_path / "run")
    images = generate(pipe)
    difftune.merge_adapter(pipe, unload=False)
    torch.testing.assert_close(denoise(pipe, inputs), adapted, atol=1e-5, rtol=1e-4)
    difftune.unmerge_adapter(pipe)

    fresh = tiny_sd35_pipeline()
    difftune.load_adapter(fresh, path)
    assert np.array_equal(generate(fresh), images)
    difftune.remove_adapter(fresh)
    torch.testing.assert_close(denoise(fresh, inputs), base, atol=0, rtol=0)


def test_sd35_folder_trains_with_the_subject_trainer(train_subject, subject_dir, tmp_path, monkeypatch):
    import difftune.model_factory

    folder = tmp_path / "sd35"
    tiny_sd35_pipeline().save_pretrained(folder)
    original = difftune.model_factory.load_pipeline

    def without_t5(*args, **kwargs):  # the tiny model has no T5, which diffusers must be told
        return original(*args, text_encoder_3=None, tokenizer_3=None, **kwargs)

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", without_t5)
    out = tmp_path / "out"
    train_subject("--pretrained_model_name_or_path", folder, "--instance_data_dir", subject_dir,
                  "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--max_train_steps", 2,
                  "--report_to", "none", "--seed", 0, "--skip_final_inference", "--learning_rate", 1e-2)
    info = difftune.read_adapter_info(out / "adapter.safetensors")
    assert any(".attn2." in t for t in info["targets"])
    fresh = tiny_sd35_pipeline()
    difftune.load_adapter(fresh, out / "adapter.safetensors")
    assert not np.array_equal(generate(fresh), generate(tiny_sd35_pipeline()))
