"""The HiPA loss: each term against an independent computation, and its defining properties."""

import sys
import types
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import ndimage

from difftune.errors import DifftuneError
from difftune.hipa.loss import (
    HiPALoss,
    HiPALossConfig,
    edge_loss,
    fourier_high_frequency_loss,
    high_pass_mask,
    load_lpips,
    sobel_edges,
    spatial_l2_loss,
)

TERMS = {
    "spatial": spatial_l2_loss,
    "fourier": fourier_high_frequency_loss,
    "edge": edge_loss,
}


def natural_image(size: int = 64, seed: int = 0) -> torch.Tensor:
    """A (1, 3, size, size) image in [-1, 1] with the 1/f amplitude spectrum of natural photographs.

    Built procedurally (random phases, amplitude 1/f per channel, mixed so channels correlate) so the
    tests need no image library and no download, while the high-vs-low-frequency balance is realistic.
    """
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / size)
    amplitude[0, 0] = 0.0
    planes = [np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((size, size)))).real for _ in range(3)]
    mixing = np.array([[1.0, 0.3, 0.1], [0.4, 1.0, 0.3], [0.2, 0.4, 1.0]])
    image = np.einsum("cd,dhw->chw", mixing, np.stack(planes))
    image = (image - image.min()) / (image.max() - image.min())
    return torch.tensor(image * 2 - 1, dtype=torch.float32)[None]


def test_mask_matches_numpy_frequencies():
    mask = high_pass_mask(8, 12, radius=0.5)
    fy, fx = np.meshgrid(np.fft.fftfreq(8), np.fft.fftfreq(12), indexing="ij")
    expected = np.hypot(fy, fx) > 0.25  # radius 0.5 of Nyquist = 0.25 cycles per pixel
    assert np.array_equal(mask.numpy(), expected)
    assert not mask[0, 0]  # the mean (DC) is never high-frequency
    with pytest.raises(DifftuneError, match="radius"):
        high_pass_mask(8, 8, radius=-0.1)


def test_fourier_term_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 16, 20, generator=gen), torch.randn(2, 3, 16, 20, generator=gen)
    spectrum = np.fft.fft2((a - b).double().numpy(), norm="ortho")
    fy, fx = np.meshgrid(np.fft.fftfreq(16), np.fft.fftfreq(20), indexing="ij")
    keep = np.hypot(fy, fx) / 0.5 > 0.3
    expected = np.abs(spectrum[..., keep]).mean()
    assert fourier_high_frequency_loss(a, b, radius=0.3).item() == pytest.approx(expected, rel=1e-5)


def test_sobel_matches_scipy():
    image = natural_image(32)
    edges = sobel_edges(image)[0].double().numpy()
    for channel in range(3):
        plane = image[0, channel].double().numpy()
        gx = ndimage.sobel(plane, axis=1, mode="nearest") / 8
        gy = ndimage.sobel(plane, axis=0, mode="nearest") / 8
        np.testing.assert_allclose(edges[channel], np.hypot(gx, gy), atol=1e-5)


@pytest.mark.parametrize("term", list(TERMS))
def test_each_term_is_zero_for_identical_images(term):
    image = natural_image()
    assert TERMS[term](image, image.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_combined_loss_zero_for_identical_and_reports_every_term():
    image = natural_image()
    total, terms = HiPALoss()(image, image.clone())
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(terms) == {"spatial_l2", "fourier", "edge"}


def _equal_energy_perturbations(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High-pass-filtered white noise and a smooth colour ramp, both with the same L2 norm."""
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(image.shape, generator=gen)
    spectrum = torch.fft.fft2(noise) * high_pass_mask(*image.shape[-2:], radius=0.5)
    high = torch.fft.ifft2(spectrum).real
    y, x = torch.meshgrid(torch.linspace(-1, 1, image.shape[-2]), torch.linspace(-1, 1, image.shape[-1]),
                          indexing="ij")
    low = torch.stack([x + 0.5, y - 0.2, 0.3 * x * y + 0.4])[None]
    scale = 0.1 * image.numel() ** 0.5
    return high / high.norm() * scale, low / low.norm() * scale


def test_high_frequency_terms_grow_far_more_for_high_frequency_noise():
    image = natural_image()
    high, low = _equal_energy_perturbations(image)
    # the spatial term cannot tell them apart: equal energy
    assert spatial_l2_loss(image + high, image).item() == pytest.approx(
        spatial_l2_loss(image + low, image).item(), rel=1e-4)
    for term in ("fourier", "edge"):
        on_high = TERMS[term](image + high, image).item()
        on_low = TERMS[term](image + low, image).item()
        assert on_high > 10 * on_low, (term, on_high, on_low)
    _, terms_high = HiPALoss()(image + high, image)
    _, terms_low = HiPALoss()(image + low, image)
    assert terms_high["fourier"] + terms_high["edge"] > 10 * (terms_low["fourier"] + terms_low["edge"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("identical", [False, True])
def test_gradients_finite_in_half_precision(dtype, identical):
    image = natural_image(32)
    target = image if identical else image + 0.05 * torch.randn(image.shape, generator=torch.Generator())
    pred = image.to(dtype).requires_grad_(True)
    total, terms = HiPALoss()(pred, target.to(dtype))
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    assert pred.grad.dtype == dtype and torch.isfinite(pred.grad).all()
    if not identical:
        assert pred.grad.abs().sum() > 0


def test_weights_combine_the_terms_and_zero_switches_a_term_off():
    image = natural_image(32)
    other = image.flip(-1)
    loss = HiPALoss(spatial_weight=0.5, fourier_weight=2.0, edge_weight=0.0, high_pass_radius=0.4)
    total, terms = loss(other, image)
    assert set(terms) == {"spatial_l2", "fourier"}
    expected = 0.5 * spatial_l2_loss(other, image) + 2.0 * fourier_high_frequency_loss(other, image, 0.4)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"edge_weight": -1.0}, "edge_weight"),
    ({"spatial_weight": 0.0, "fourier_weight": 0.0, "edge_weight": 0.0}, "weight 0"),
    ({"high_pass_radius": 2.0}, "high_pass_radius"),
])
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(DifftuneError, match=message):
        HiPALoss(**options)


def test_config_object_and_keyword_options_are_exclusive():
    _, terms = HiPALoss(HiPALossConfig(edge_weight=0.0))(natural_image(16), natural_image(16))
    assert set(terms) == {"spatial_l2", "fourier"}
    with pytest.raises(DifftuneError, match="not both"):
        HiPALoss(HiPALossConfig(), edge_weight=1.0)


def test_mismatched_images_are_refused():
    with pytest.raises(DifftuneError, match="fourier"):
        fourier_high_frequency_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_lpips_without_the_package_gives_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "lpips_vgg.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips now raises ImportError
    with pytest.raises(DifftuneError, match="torchvision"):
        HiPALoss(lpips_weights=str(path))
    with pytest.raises(DifftuneError, match="safetensors"):
        load_lpips(tmp_path / "missing.pth")


class _FakeLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS: records how it was built; distance = mean |a − b|·w."""

    built_with: ClassVar[dict] = {}

    def __init__(self, **kwargs):
        super().__init__()
        _FakeLPIPS.built_with = kwargs
        self.lin0 = torch.nn.Conv2d(3, 1, 1, bias=False)

    def forward(self, a, b):
        return self.lin0((a - b).abs()).mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_is_built_offline_and_loaded_strictly_from_the_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=_FakeLPIPS))
    weights = {"lin0.weight": torch.full((1, 3, 1, 1), 2.0)}
    path = tmp_path / "lpips_vgg.safetensors"
    save_file(weights, str(path))
    loss = HiPALoss(lpips_weights=str(path), fourier_weight=0.0, edge_weight=0.0)
    assert _FakeLPIPS.built_with == {"pretrained": False, "net": "vgg", "pnet_rand": True, "verbose": False}
    a, b = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    total, terms = loss(a, b)
    assert set(terms) == {"spatial_lpips"} and total.item() == pytest.approx(3.0)  # 3 channels · 0.5 · 2
    assert not any(p.requires_grad for p in loss.perceptual.parameters())
    save_file({"other.weight": torch.zeros(1)}, str(path))
    with pytest.raises(DifftuneError, match="missing"):
        load_lpips(path)
