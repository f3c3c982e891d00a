"""FID and KID through torchmetrics, with every result saying how it was measured.

FID is only comparable within one extractor, resize mode and pair of sample counts, so
``FidResult`` carries all three. Extractors:

- ``inception``: torch-fidelity's Inception v3 (the standard FID; needs the ``eval``
  extra, and downloads its weights unless ``inception:<local weights file>`` is given).
  ``antialias=False`` reproduces torch-fidelity / TF numbers; torchmetrics ≥ 1.8
  defaults to True.
- ``clip:<hub id or folder>`` / ``dino:<hub id or folder>``: an image encoder from
  transformers (offline with a local folder).
- any ``nn.Module`` returning (N, D) with an int ``num_features``.

Features are extracted once per image set (``extract_features``) and handed to
torchmetrics' FID / KID through an identity module, so the real set's features can be
reused for many generated sets and both metrics share one pass. Statistics are float64.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DifftuneError
from .features import ClipImageFeatures, DinoImageFeatures, extract_features

EVAL_EXTRA_HINT = 'install the eval extra (pip install -e ".[eval]") for torch-fidelity\'s Inception'


@dataclass
class FidResult:
    """One FID (and optionally KID) with the facts needed to compare it to another."""

    fid: float
    extractor: str
    resize: str
    num_features: int
    real_count: int
    generated_count: int
    kid_mean: float | None = None
    kid_std: float | None = None
    kid_subsets: int | None = None
    kid_subset_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for tables: the number and the setting it belongs to."""
        kid = f", KID {self.kid_mean:.4f} ± {self.kid_std:.4f}" if self.kid_mean is not None else ""
        return (f"FID {self.fid:.3f}{kid} [{self.extractor}, {self.num_features}-d, {self.resize}, "
                f"{self.real_count} real / {self.generated_count} generated]")


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception v3 pool features (2048-d) through torchmetrics, uint8 images in."""

    def __init__(self, weights_path: str | None = None, antialias: bool = False,
                 num_features: int = 2048) -> None:
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise DifftuneError(f"--fid_extractor inception needs torch-fidelity, which is not installed: "
                                f"{EVAL_EXTRA_HINT}, or use a clip:/dino: extractor")
        if weights_path is not None and not Path(weights_path).is_file():
            raise DifftuneError(f"Inception weights file {weights_path} does not exist")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(num_features)],
                                            feature_extractor_weights_path=weights_path, antialias=antialias)
        self.num_features = num_features
        self.antialias = antialias
        self.name = "inception-v3-compat" + (f" ({Path(weights_path).name})" if weights_path else "")

    def describe_preprocessing(self) -> str:
        return f"resized to 299 inside the network (antialias={self.antialias})"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.inception(images).double()


def load_feature_extractor(spec: str | nn.Module, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, batch_size: int = 64,
                           antialias: bool | None = None) -> nn.Module:
    """An extractor from ``inception[:weights]``, ``clip:<id or folder>``, ``dino:<id or folder>``.

    ``antialias`` None keeps each extractor's default: False for Inception (matches
    torch-fidelity), True for the transformers encoders.
    """
    if isinstance(spec, nn.Module):
        if not isinstance(getattr(spec, "num_features", None), int):
            raise DifftuneError(f"feature extractor {type(spec).__name__} needs an int num_features")
        return spec.to(device)
    kind, _, source = spec.partition(":")
    if kind == "inception":
        return InceptionFeatures(source or None, antialias=bool(antialias)).to(device)
    if kind in ("clip", "dino") and source:
        options: dict[str, Any] = {"batch_size": batch_size}
        if antialias is not None:
            options["antialias"] = antialias
        cls = ClipImageFeatures if kind == "clip" else DinoImageFeatures
        return cls.from_pretrained(source, dtype=dtype, **options).to(device)
    raise DifftuneError(f"unknown FID feature extractor '{spec}': use inception, inception:<weights file>, "
                        "clip:<hub id or folder> or dino:<hub id or folder>")


def describe_extractor(extractor: nn.Module) -> tuple[str, str]:
    """(name, resize mode) of an extractor, for FidResult."""
    name = getattr(extractor, "name", type(extractor).__name__)
    describe = getattr(extractor, "describe_preprocessing", None)
    return name, describe() if callable(describe) else "as given (custom extractor)"


class _Identity(nn.Module):
    """Hands precomputed features to torchmetrics unchanged."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real_features: torch.Tensor, generated_features: torch.Tensor) -> float:
    """FID between two (N, D) feature sets: torchmetrics' computation in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_pair(real_features, generated_features, minimum=2, metric="FID")
    metric = FrechetInceptionDistance(feature=_Identity(real_features.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real_features.double(), real=True)
    metric.update(generated_features.double(), real=False)
    return float(metric.compute())


class FidReference:
    """A real feature set's mean and covariance (float64), with the square root of the covariance computed
    once, so the FID of many generated sets against it (a bootstrap's replicates) costs one symmetric
    eigen-decomposition each: tr √(Σ_r Σ_g) = Σ √λ of Σ_r^½ Σ_g Σ_r^½, the same value as torchmetrics'."""

    def __init__(self, real_features: torch.Tensor):
        real = real_features.double()
        self.mean = real.mean(0)
        covariance = torch.cov(real.T)
        values, vectors = torch.linalg.eigh(covariance)
        self.sqrt_covariance = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        self.trace = float(covariance.trace())

    def distance(self, generated_features: torch.Tensor) -> float:
        generated = generated_features.double()
        covariance = torch.cov(generated.T)
        product = self.sqrt_covariance @ covariance @ self.sqrt_covariance
        cross = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
        difference = float((self.mean - generated.mean(0)).square().sum())
        return difference + self.trace + float(covariance.trace()) - 2 * float(cross)


def kernel_distance(real_features: torch.Tensor, generated_features: torch.Tensor, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """KID (mean, std, subset size used) with a fixed seed for the random subsets.

    The subset size is cut to the smaller set's size, so small evaluations still run.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_pair(real_features, generated_features, minimum=2, metric="KID")
    size = min(subset_size, len(real_features), len(generated_features))
    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Identity(real_features.shape[1]), subsets=subsets,
                                         subset_size=size)
    metric.update(real_features.double(), real=True)
    metric.update(generated_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def fid_from_features(real_features: torch.Tensor, generated_features: torch.Tensor, extractor: nn.Module,
                      kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
                      seed: int = 0) -> FidResult:
    """FID (and KID) from precomputed features, labelled with the extractor that made them."""
    name, resize = describe_extractor(extractor)
    result = FidResult(
        fid=frechet_distance(real_features, generated_features),
        extractor=name,
        resize=resize,
        num_features=int(real_features.shape[1]),
        real_count=len(real_features),
        generated_count=len(generated_features),
    )
    if kid:
        result.kid_mean, result.kid_std, result.kid_subset_size = kernel_distance(
            real_features, generated_features, kid_subsets, kid_subset_size, seed)
        result.kid_subsets = kid_subsets
    return result


def compute_fid(real_images: Any, generated_images: Any, extractor: nn.Module, batch_size: int = 64,
                kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                progress: bool = True) -> FidResult:
    """FID/KID between two image sets (uint8 or [0, 1] tensors, or sequences of PIL images)."""
    real = extract_features(extractor, real_images, batch_size, "FID real" if progress else None)
    generated = extract_features(extractor, generated_images, batch_size,
                                 "FID generated" if progress else None)
    return fid_from_features(real, generated, extractor, kid, kid_subsets, kid_subset_size, seed)


def _check_pair(real: torch.Tensor, generated: torch.Tensor, minimum: int, metric: str) -> None:
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"{metric} needs two (N, D) feature sets of equal D, got {tuple(real.shape)} "
                         f"and {tuple(generated.shape)}")
    if len(real) < minimum or len(generated) < minimum:
        raise ValueError(f"{metric} needs at least {minimum} images per set, got {len(real)} real and "
                         f"{len(generated)} generated")
