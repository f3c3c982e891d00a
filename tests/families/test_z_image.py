"""Z-Image on its tiny offline model: the built-in, presets, the family's denoiser call against the
pipeline's own first step, latents and noise as diffusers' Z-Image script makes them, the subject
trainer with every method, and HiPA."""

import family_checks as checks
import torch

CPU = torch.device("cpu")


def test_tiny_z_image_is_the_published_layout_built_offline_and_saved_the_normal_way(tmp_path):
    pipe = checks.check_saved_folder_loads_the_normal_way("z-image", tmp_path)
    assert (type(pipe).__name__, type(pipe.text_encoder).__name__) == ("ZImagePipeline", "Qwen3Model")
    positive, _ = pipe.encode_prompt(prompt=["a red cube", "a tan cube"], do_classifier_free_guidance=False)
    assert positive[0].shape[-1] == pipe.transformer.config.cap_feat_dim
    assert (positive[0] - positive[1]).abs().max() > 0


def test_hipa_on_z_image_trains_the_one_step_the_pipeline_samples(tmp_path):
    checks.check_hipa_one_step("z-image", tmp_path, guidance_scale=1.0)
