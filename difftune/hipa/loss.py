"""The high-frequency-promoting loss of HiPA: a spatial term plus high-frequency terms.

One-step samples of a base model have the right layout and colours but lack fine
detail, and a plain L2 loss barely notices: blur removes little energy. The
high-frequency terms compare only what blur removes: the spectrum outside a radius
(L1 between the high-pass-filtered 2-D Fourier transforms) and Sobel edge maps (L1).

Each term is a function usable alone; `HiPALoss` combines them with configurable
weights and returns the unweighted terms for logging. Images are (B, C, H, W), any
float dtype; the FFT and Sobel terms compute in float32 (fp16 FFTs are not available
everywhere and lose precision), so gradients stay finite under fp16/bf16 training.
LPIPS is optional and only from a local weights file (see `load_lpips`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DifftuneError
from ..options import option

# Sobel derivative kernels, divided by 8 so a unit ramp per pixel gives gradient 1.
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
_SOBEL_Y = _SOBEL_X.t().contiguous()
_EDGE_EPS = 1e-12  # inside the square root: finite gradient where an image is flat


def _check_pair(pred: torch.Tensor, target: torch.Tensor, term: str) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise DifftuneError(f"HiPA loss '{term}': expected two (B, C, H, W) images of one shape, "
                            f"got {tuple(pred.shape)} and {tuple(target.shape)}")


def spatial_l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in pixel space (computed in float32)."""
    _check_pair(pred, target, "spatial")
    return F.mse_loss(pred.float(), target.float())


def high_pass_mask(height: int, width: int, radius: float, device: torch.device | str = "cpu"
                   ) -> torch.Tensor:
    """True at the frequencies kept by the high-pass filter, in `torch.fft.fft2` layout.

    ``radius`` is a fraction of the Nyquist frequency (0.5 cycles per pixel): a
    frequency (fy, fx) is kept when sqrt(fy² + fx²) / 0.5 > radius. Measuring in
    cycles per pixel makes the filter mean the same detail scale at any resolution.
    """
    if not 0.0 <= radius < math.sqrt(2.0):
        raise DifftuneError(f"high-pass radius must be in [0, sqrt(2)) (a fraction of Nyquist), got {radius}")
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]  # float64 on CPU: exact ties
    fx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    return (torch.sqrt(fy**2 + fx**2) / 0.5 > radius).to(device)


def fourier_high_frequency_loss(pred: torch.Tensor, target: torch.Tensor, radius: float = 0.25
                                ) -> torch.Tensor:
    """L1 between the high-pass-filtered spectra: mean |F(pred) − F(target)| over kept frequencies.

    The complex difference is used (not only the amplitudes), so detail in the wrong
    place is penalised too. ``norm="ortho"`` keeps the scale of the image values.
    """
    _check_pair(pred, target, "fourier")
    mask = high_pass_mask(pred.shape[-2], pred.shape[-1], radius, pred.device)
    if not mask.any():
        raise DifftuneError(f"high-pass radius {radius} keeps no frequency of a "
                            f"{pred.shape[-2]}x{pred.shape[-1]} image")
    difference = torch.fft.fft2(pred.float() - target.float(), norm="ortho")
    return difference.abs()[..., mask].mean()


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude (B, C, H, W), float32, border replicated."""
    if images.dim() != 4:
        raise DifftuneError(f"sobel_edges expects (B, C, H, W) images, got {tuple(images.shape)}")
    channels = images.shape[1]
    x = F.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    kernels = torch.stack([_SOBEL_X, _SOBEL_Y]).to(x.device)[:, None]  # (2, 1, 3, 3)
    gradients = F.conv2d(x, kernels.repeat(channels, 1, 1, 1), groups=channels)
    gx, gy = gradients[:, 0::2], gradients[:, 1::2]
    return torch.sqrt(gx**2 + gy**2 + _EDGE_EPS)


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the Sobel edge maps of the two images."""
    _check_pair(pred, target, "edge")
    return F.l1_loss(sobel_edges(pred), sobel_edges(target))


def load_lpips(weights_path: str | os.PathLike, net: str = "vgg") -> nn.Module:
    """An LPIPS module whose every weight comes from a local safetensors file.

    Uses the reference ``lpips`` package, which imports torchvision: no LPIPS
    implementation works without torchvision, so where either is missing this
    raises a clear error (use the L2 spatial term instead). The network is built
    untrained (nothing is downloaded) and the file must hold its whole state dict,
    backbone and linear heads; it is loaded strictly, so a file with only the
    heads is refused rather than leaving a random backbone. Make such a file once,
    where lpips can download: ``save_file(lpips.LPIPS(net="vgg").state_dict(), path)``.
    """
    from safetensors.torch import load_file

    path = os.fspath(weights_path)
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        raise DifftuneError(f"--lpips_weights: expected an existing .safetensors file, got {path}")
    try:
        import lpips  # the reference implementation (imports torchvision)
    except Exception as error:  # ImportError, or torchvision failing to import
        raise DifftuneError(
            "the LPIPS spatial term needs the 'lpips' package and a working torchvision, which "
            f"are not importable here ({type(error).__name__}: {error}). No LPIPS implementation "
            "works without torchvision; use the L2 spatial term (leave --lpips_weights unset)."
        ) from error
    model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)
    state = load_file(path)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DifftuneError(f"{path}: not a full LPIPS-{net} state dict: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model


@dataclasses.dataclass
class HiPALossConfig:
    """Weights and settings of the HiPA loss; a zero weight switches a term off."""

    spatial_weight: float = option(1.0, "weight of the spatial term (L2, or LPIPS with --lpips_weights)")
    fourier_weight: float = option(0.2, "weight of the L1 between high-pass-filtered Fourier spectra")
    edge_weight: float = option(0.3, "weight of the L1 between Sobel edge maps")
    high_pass_radius: float = option(0.25, "high-pass radius as a fraction of Nyquist (0.5 cycles/pixel)")
    lpips_weights: str | None = option(None, "local LPIPS weights file: the spatial term becomes LPIPS")
    lpips_net: str = option("vgg", "LPIPS backbone of that file (vgg or alex)")

    def validate(self) -> None:
        for name in ("spatial_weight", "fourier_weight", "edge_weight"):
            if getattr(self, name) < 0:
                raise DifftuneError(f"HiPA loss option '{name}' must be >= 0, got {getattr(self, name)}")
        if self.spatial_weight == self.fourier_weight == self.edge_weight == 0:
            raise DifftuneError("HiPA loss: every term has weight 0")
        if not 0.0 <= self.high_pass_radius < math.sqrt(2.0):
            raise DifftuneError(f"HiPA loss option 'high_pass_radius' must be in [0, sqrt(2)), "
                                f"got {self.high_pass_radius}")


class HiPALoss(nn.Module):
    """weight_s · spatial + weight_f · Fourier high-pass L1 + weight_e · Sobel-edge L1.

    ``forward(pred, target)`` takes pixel images (the decoded one-step prediction and
    the teacher's sample, in [-1, 1]) and returns ``(total, terms)`` where ``terms``
    maps each active term's name to its unweighted, detached value, for logging.
    ``perceptual`` replaces the spatial term by any callable (pred, target) → loss.
    """

    def __init__(self, config: HiPALossConfig | None = None,
                 perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 **options: Any):
        super().__init__()
        self.config = config if config is not None else HiPALossConfig(**options)
        if config is not None and options:
            raise DifftuneError("HiPALoss: pass either a config or keyword options, not both")
        self.config.validate()
        if perceptual is None and self.config.lpips_weights and self.config.spatial_weight > 0:
            perceptual = load_lpips(self.config.lpips_weights, self.config.lpips_net)
        self.perceptual = perceptual
        self.spatial_name = "spatial_l2" if perceptual is None else "spatial_lpips"

    def _spatial(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.perceptual is None:
            return spatial_l2_loss(pred, target)
        return self.perceptual(pred, target).float().mean()

    def forward(self, pred: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        target = target.to(pred.device)
        parts: list[tuple[str, float, Callable[[], torch.Tensor]]] = [
            (self.spatial_name, cfg.spatial_weight, lambda: self._spatial(pred, target)),
            ("fourier", cfg.fourier_weight,
             lambda: fourier_high_frequency_loss(pred, target, cfg.high_pass_radius)),
            ("edge", cfg.edge_weight, lambda: edge_loss(pred, target)),
        ]
        total = pred.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        for name, weight, compute in parts:
            if weight > 0:
                value = compute()
                total = total + weight * value
                terms[name] = value.detach()
        return total, terms
