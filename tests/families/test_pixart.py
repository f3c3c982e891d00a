"""The layer-wrapping methods on a PixArt DiT (the tiny pipelines cover SD 1.x, SDXL, SD3):
attach keeps the output, merge equals the unmerged forward, remove restores the model."""

import pytest
import torch
from conftest import randomize_adapter

import difftune


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, in_channels=4, out_channels=8,
                                    cross_attention_dim=16, caption_channels=24, norm_num_groups=None)


def run(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(2, 4, 8, 8, generator=gen),
                     encoder_hidden_states=torch.randn(2, 5, 24, generator=gen),
                     timestep=torch.tensor([10, 500]),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


@pytest.mark.parametrize(("method", "options"), [("svfit", {}), ("tlora", {}),
                                                 ("tlora", {"residual": "lora", "transform_rank": 1})])
@pytest.mark.parametrize("targets", ["attn", "all"])  # "all" includes the strided patch-embedding conv
def test_pixart(method, options, targets):
    model = tiny_pixart()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = run(model)
    difftune.add_adapter(model, method, targets=targets, **options)
    torch.testing.assert_close(run(model), base, atol=1e-6, rtol=0)
    randomize_adapter(model, std=0.1)
    adapted = run(model)
    assert (adapted - base).abs().max() > 1e-3
    difftune.merge_adapter(model, unload=False)
    torch.testing.assert_close(run(model), adapted, atol=1e-5, rtol=1e-4)
    difftune.unmerge_adapter(model)
    difftune.remove_adapter(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
