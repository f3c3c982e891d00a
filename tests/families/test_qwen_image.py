"""Qwen-Image on its tiny offline model: the built-in, presets, the family's denoiser call against the
pipeline's own first step, latents and noise as diffusers' Qwen-Image script makes them, the subject
trainer with every method, and HiPA."""

import family_checks as checks
import torch

CPU = torch.device("cpu")


def pack(latents):
    """(B, C, H, W) → Qwen-Image's tokens of 2x2 patches, row by row (B, H/2·W/2, 4C)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack(tokens, side):
    b, _, c4 = tokens.shape
    return tokens.view(b, side // 2, side // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c4 // 4, side, side)


def test_tiny_qwen_image_is_the_published_layout_built_offline_and_saved_the_normal_way(tmp_path):
    pipe = checks.check_saved_folder_loads_the_normal_way("qwen-image", tmp_path)
    assert (type(pipe).__name__, type(pipe.text_encoder).__name__, type(pipe.vae).__name__) == (
        "QwenImagePipeline", "Qwen2_5_VLForConditionalGeneration", "AutoencoderKLQwenImage")
    embeds, _ = pipe.encode_prompt(prompt=["a red cube", "a tan cube"])
    assert embeds.shape[-1] == pipe.transformer.config.joint_attention_dim
    assert (embeds[0] - embeds[1]).abs().max() > 0


def test_hipa_on_qwen_image_trains_the_one_step_the_pipeline_samples(tmp_path):
    checks.check_hipa_one_step("qwen-image", tmp_path, guidance_scale=1.0)
