"""Evaluation metrics: FID/KID, CLIP score, CLIP-I/CLIP-T, DINO, VLHI, and result writers.

Heavy imports (transformers, torchmetrics' image metrics) happen inside functions, so
importing this package is cheap.
"""

from .features import ClipImageFeatures, DinoImageFeatures, ImageFeatures, extract_features
from .fid import (
    FidResult,
    compute_fid,
    fid_from_features,
    frechet_distance,
    kernel_distance,
    load_feature_extractor,
)
from .similarity import (
    ClipSimilarity,
    DinoSimilarity,
    cosine_matrix,
    mean_pairwise_cosine,
    neutral_prompt,
    paired_cosine,
)
from .vlhi import vlhi

__all__ = [
    "ClipImageFeatures",
    "ClipSimilarity",
    "DinoImageFeatures",
    "DinoSimilarity",
    "FidResult",
    "ImageFeatures",
    "compute_fid",
    "cosine_matrix",
    "extract_features",
    "fid_from_features",
    "frechet_distance",
    "kernel_distance",
    "load_feature_extractor",
    "mean_pairwise_cosine",
    "neutral_prompt",
    "paired_cosine",
    "vlhi",
]
