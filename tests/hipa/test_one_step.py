"""One-step prediction: the closed forms, the timestep, and generation through standard pipelines."""

import functools

import numpy as np
import pytest
import torch
from conftest import randomize_adapter
from diffusers import DDIMScheduler
from torch import nn

import difftune
from difftune.errors import DifftuneError
from difftune.families.sd import SDFamily
from difftune.families.sd3 import SD3Family
from difftune.families.sdxl import SDXLFamily
from difftune.hipa.one_step import (
    FLOW_PREDICTION,
    decode_latents,
    generate_one_step,
    one_step_scheduler,
    one_step_timestep,
    predict_x0,
    x0_from_epsilon,
    x0_from_flow,
    x0_from_v,
)

PIPELINES = {
    "sd-epsilon": lambda: SDFamily.build_tiny(),
    "sd-v": lambda: SDFamily.build_tiny(prediction_type="v_prediction"),
    "sdxl": SDXLFamily.build_tiny,
    "sd3": SD3Family.build_tiny,
}


@functools.cache
def shared_pipeline(name: str):
    """One pipeline per kind for the tests that leave it as they found it."""
    return PIPELINES[name]()


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)


@pytest.mark.parametrize("alpha_prod", [0.0047, 0.3, 0.97])
def test_closed_forms_recover_x0_from_the_true_prediction(alpha_prod):
    x0, eps = _pair()
    a, s = alpha_prod**0.5, (1 - alpha_prod) ** 0.5
    x_t = a * x0 + s * eps
    torch.testing.assert_close(x0_from_epsilon(eps, x_t, alpha_prod), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_from_v(a * eps - s * x0, x_t, alpha_prod), x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_flow_closed_form_recovers_x0(sigma):
    x0, eps = _pair()
    x_t = (1 - sigma) * x0 + sigma * eps
    torch.testing.assert_close(x0_from_flow(eps - x0, x_t, sigma), x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("timestep", [999, 500])
def test_closed_forms_match_diffusers_ddim(prediction_type, timestep):
    name = {"epsilon": "sd-epsilon", "v_prediction": "sd-v"}[prediction_type]
    scheduler = DDIMScheduler.from_config(shared_pipeline(name).scheduler.config)
    scheduler.set_timesteps(10)
    model_output, x_t = _pair(1)
    expected = scheduler.step(model_output, timestep, x_t).pred_original_sample
    alpha_prod = float(scheduler.alphas_cumprod[timestep])
    closed = {"epsilon": x0_from_epsilon, "v_prediction": x0_from_v}[prediction_type]
    torch.testing.assert_close(closed(model_output, x_t, alpha_prod), expected, rtol=1e-4, atol=1e-4)


def test_one_step_timestep_is_the_last_one():
    sd = shared_pipeline("sd-epsilon")
    step = one_step_timestep(sd.scheduler)
    assert step.prediction_type == "epsilon" and int(step.timestep) == 999
    assert step.alpha_prod == pytest.approx(float(sd.scheduler.alphas_cumprod[999]))
    v_step = one_step_timestep(shared_pipeline("sd-v").scheduler)
    assert v_step.prediction_type == "v_prediction" and int(v_step.timestep) == 999
    flow = one_step_timestep(shared_pipeline("sd3").scheduler)
    assert flow.prediction_type == FLOW_PREDICTION and float(flow.timestep) == 1000.0 and flow.sigma == 1.0


class KnownDenoiser(nn.Module):
    """Returns the exact ε / v / velocity that maps its input back to a fixed x0.

    It reads ᾱ (or σ) for the timestep it is given from the training schedule itself,
    so a wrong timestep gives a wrong x̂0.
    """

    def __init__(self, x0: torch.Tensor, prediction_type: str, alphas_cumprod=None, num_train_timesteps=1000):
        super().__init__()
        self.x0, self.prediction_type = x0, prediction_type
        self.alphas_cumprod, self.num_train_timesteps = alphas_cumprod, num_train_timesteps
        self.weight = nn.Parameter(torch.zeros(()))  # something for gradients to reach
        self.calls = 0

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        self.calls += 1
        assert encoder_hidden_states is not None
        t = timestep[0]
        if self.prediction_type == FLOW_PREDICTION:
            sigma = float(t) / self.num_train_timesteps
            eps = (sample - (1 - sigma) * self.x0) / sigma
            out = eps - self.x0
        else:
            alpha_prod = float(self.alphas_cumprod[int(t)])
            eps = (sample - alpha_prod**0.5 * self.x0) / (1 - alpha_prod) ** 0.5
            velocity = alpha_prod**0.5 * eps - (1 - alpha_prod) ** 0.5 * self.x0
            out = eps if self.prediction_type == "epsilon" else velocity
        return (out + self.weight,)


@pytest.mark.parametrize("name", ["sd-epsilon", "sd-v", "sd3"])
def test_predict_x0_with_a_known_denoiser_returns_x0(name):
    pipe = shared_pipeline(name)
    step = one_step_timestep(pipe.scheduler)
    x0, noise = _pair(2)
    stub = KnownDenoiser(x0, step.prediction_type, getattr(pipe.scheduler, "alphas_cumprod", None))
    prediction = predict_x0(stub, noise, step, encoder_hidden_states=torch.zeros(2, 3, 8))
    torch.testing.assert_close(prediction, x0, rtol=1e-4, atol=1e-4)
    prediction.sum().backward()
    assert stub.calls == 1 and stub.weight.grad is not None


def _capture_denoiser_calls(denoiser: nn.Module) -> tuple[list, object]:
    calls: list = []
    handle = denoiser.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(
            (args[0].clone() if args else (kwargs.get("sample", kwargs.get("hidden_states"))).clone(),
             kwargs.get("timestep", args[1] if len(args) > 1 else None), output[0].clone())),
        with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("name", list(PIPELINES))
def test_generate_one_step_is_one_call_from_pure_noise_decoded_x0(name):
    pipe = shared_pipeline(name)
    denoiser, _ = difftune.find_denoiser(pipe)
    original = pipe.scheduler
    calls, handle = _capture_denoiser_calls(denoiser)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    try:
        images = generate_one_step(pipe, "a red circle", height=32, width=32, latents=noise,
                                   output_type="np").images
    finally:
        handle.remove()

    assert pipe.scheduler is original  # restored
    assert len(calls) == 1
    model_input, timestep, model_output = calls[0]
    torch.testing.assert_close(model_input, noise)  # the single step starts from pure noise
    step = one_step_timestep(pipe.scheduler)
    assert float(timestep.flatten()[0]) == float(step.timestep)
    with torch.no_grad():
        pixels = decode_latents(pipe.vae, step.x0(model_output, model_input))
    expected = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, atol=2e-5)


def test_generate_one_step_with_a_loaded_adapter(tmp_path):
    trained = SDFamily.build_tiny()
    difftune.add_adapter(trained.unet, "lora", targets="attn", rank=4)
    randomize_adapter(trained.unet, std=0.2)
    path = difftune.save_adapter(trained.unet, tmp_path / "adapter.safetensors")

    def image(pipe):
        return generate_one_step(pipe, "a red circle", height=32, width=32, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images

    fresh = SDFamily.build_tiny()
    base = image(fresh)
    difftune.load_adapter(fresh, path)
    adapted = image(fresh)
    np.testing.assert_allclose(adapted, image(trained), atol=1e-6)
    assert np.abs(adapted - base).max() > 1e-3


def test_refusals():
    with pytest.raises(DifftuneError, match="steps is fixed"):
        generate_one_step(shared_pipeline("sd-epsilon"), "x", num_inference_steps=4)
    zero_snr = DDIMScheduler.from_config(shared_pipeline("sd-epsilon").scheduler.config,
                                         rescale_betas_zero_snr=True)
    with pytest.raises(DifftuneError, match="zero-terminal-SNR"):
        one_step_scheduler(zero_snr)
    v_zero_snr = DDIMScheduler.from_config(zero_snr.config, prediction_type="v_prediction")
    assert one_step_timestep(v_zero_snr).alpha_prod == pytest.approx(0.0, abs=1e-6)  # v works there


def test_readme_one_step_snippet_runs(tmp_path, monkeypatch):
    """The HiPA page's inference example, with the tiny model in place of the embedded one."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs/methods/hipa.md").read_text()
    section = page[page.index("# One-step generation (HiPA)"):]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "generate_one_step(pipe" in snippet and "num_inference_steps=1" in snippet
    monkeypatch.chdir(tmp_path)
    trained = SDFamily.build_tiny()
    difftune.add_adapter(trained.unet, "lora", rank=4)
    difftune.save_adapter(trained.unet, tmp_path / "outputs/one_step/adapter.safetensors")
    snippet = snippet.replace('"builtin:embedded"', '"builtin:tiny-sd"')
    namespace: dict = {}
    exec(compile(snippet, "docs/methods/hipa.md", "exec"), namespace)
    assert namespace["image"].size == (64, 64)
