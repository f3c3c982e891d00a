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


# --- the subject trainer (train_scripts/train_subject.py) --------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SUBJECT = os.path.join(ROOT, "train_scripts", "train_subject.py")


def make_subject_images(folder, count: int = 3, size=(72, 64), seed: int = 0):
    """A few small images of one made-up "subject": a coloured disc on a varying background."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    for i in range(count):
        background = rng.integers(0, 255, 3)
        image = np.empty((size[1], size[0], 3), dtype=np.uint8)
        image[:] = background
        cx, cy = size[0] // 2 + rng.integers(-8, 8), size[1] // 2 + rng.integers(-8, 8)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < 18 ** 2] = (230, 40, 40)
        Image.fromarray(image).save(os.path.join(folder, f"subject_{i}.png"))
    return folder


def train_script_runner(path: str):
    """``run(*flags)``: the script's main() in this process (fast), accelerate state reset after.

    ``run.module`` is the loaded script, for monkeypatching its names.
    """
    import importlib.util

    from accelerate.state import AcceleratorState, GradientState

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(*flags):
        try:
            return module.main([str(flag) for flag in flags])
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()

    run.module = module
    return run


@pytest.fixture(scope="session")
def train_subject():
    return train_script_runner(TRAIN_SUBJECT)


@pytest.fixture
def subject_dir(tmp_path):
    return make_subject_images(tmp_path / "subject")
