"""Shared fixtures. Tests run offline: no hub, tiny random models built from configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from difftune.model_factory import TINY_BUILDERS

torch.set_num_threads(min(2, torch.get_num_threads()))

FAMILY_BUILDERS = {"sd": "tiny-sd", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3"}


def build(family: str, seed: int = 0):
    return TINY_BUILDERS[FAMILY_BUILDERS[family]](seed)


@pytest.fixture(params=list(FAMILY_BUILDERS))
def family(request) -> str:
    return request.param


def denoiser_inputs(pipe, batch: int = 1, seed: int = 0) -> dict:
    """Deterministic inputs for one denoiser forward call of any tiny family."""
    gen = torch.Generator().manual_seed(seed)
    if hasattr(pipe, "transformer"):
        cfg = pipe.transformer.config
        return {
            "hidden_states": torch.randn(batch, cfg.in_channels, 32, 32, generator=gen),
            "encoder_hidden_states": torch.randn(batch, 7, cfg.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
            "timestep": torch.full((batch,), 500.0),
        }
    cfg = pipe.unet.config
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, 32, 32, generator=gen),
        "timestep": torch.full((batch,), 500),
        "encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=gen),
    }
    if cfg.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=gen),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


def denoise(pipe, inputs: dict) -> torch.Tensor:
    model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def generate(pipe, seed: int = 0, prompt: str = "a photo of a sks dog"):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=gen,
                output_type="np").images


def randomize_adapter(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every trainable adapter parameter a random value (a stand-in for training)."""
    import difftune

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in difftune.trainable_parameters(model):
            param.add_(torch.randn(param.shape, generator=gen) * std)
