"""How large each HiPA loss term is for the degradations it must see: the basis of the default weights.

Three photographs that ship with scikit-image, resized to 256 px, are compared with
(a) Gaussian-blurred copies (what one-step samples look like: layout right, detail
missing), (b) a copy plus high-pass-filtered noise and (c) a copy plus a smooth colour
ramp of the same energy as (b). Prints one Markdown table with the unweighted terms and
each term's weighted share of the total under the default weights.

    pip install scikit-image   # the photographs and the blur; not a difftune dependency
    python benchmarks/hipa_loss_terms.py [--size 256] [--radius 0.25]
"""

from __future__ import annotations

import argparse

import torch
from skimage import data, filters, transform

from difftune.errors import run_main
from difftune.hipa.loss import (
    HiPALossConfig,
    edge_loss,
    fourier_high_frequency_loss,
    high_pass_mask,
    spatial_l2_loss,
)

IMAGES = ("astronaut", "chelsea", "coffee")


def photograph(name: str, size: int) -> torch.Tensor:
    image = transform.resize(getattr(data, name)() / 255.0, (size, size), anti_aliasing=True)
    return torch.tensor(image * 2 - 1, dtype=torch.float32).permute(2, 0, 1)[None]


def blurred(image: torch.Tensor, sigma: float) -> torch.Tensor:
    array = image[0].permute(1, 2, 0).numpy()
    return torch.tensor(filters.gaussian(array, sigma=sigma, channel_axis=-1)).permute(2, 0, 1)[None].float()


def equal_energy_pair(image: torch.Tensor, rms: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """High-pass noise and a smooth ramp, both with root-mean-square value ``rms``."""
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
    high = torch.fft.ifft2(torch.fft.fft2(noise) * high_pass_mask(*image.shape[-2:], radius=0.5)).real
    y, x = torch.meshgrid(torch.linspace(-1, 1, image.shape[-2]), torch.linspace(-1, 1, image.shape[-1]),
                          indexing="ij")
    low = torch.stack([x + 0.5, y - 0.2, 0.3 * x * y + 0.4])[None]
    scale = rms * image.numel() ** 0.5
    return high / high.norm() * scale, low / low.norm() * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--radius", type=float, default=HiPALossConfig.high_pass_radius)
    args = parser.parse_args()
    weights = HiPALossConfig()
    print(f"weights: spatial {weights.spatial_weight}, fourier {weights.fourier_weight}, "
          f"edge {weights.edge_weight}; radius {args.radius} of Nyquist; {args.size} px\n")
    print("| image | degradation | L2 | Fourier HF L1 | Sobel L1 | weighted shares L2 / Fourier / Sobel |")
    print("|---|---|---|---|---|---|")
    for name in IMAGES:
        image = photograph(name, args.size)
        high, low = equal_energy_pair(image)
        cases = [(f"blur σ={s}", blurred(image, s)) for s in (1, 2, 4)]
        cases += [("+ high-pass noise, rms 0.1", image + high), ("+ smooth ramp, rms 0.1", image + low)]
        for label, degraded in cases:
            l2 = spatial_l2_loss(degraded, image).item()
            fourier = fourier_high_frequency_loss(degraded, image, args.radius).item()
            edge = edge_loss(degraded, image).item()
            parts = [weights.spatial_weight * l2, weights.fourier_weight * fourier,
                     weights.edge_weight * edge]
            shares = " / ".join(f"{p / sum(parts):.0%}" for p in parts)
            print(f"| {name} | {label} | {l2:.4f} | {fourier:.4f} | {edge:.4f} | {shares} |")


if __name__ == "__main__":
    run_main(main)
