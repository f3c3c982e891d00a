"""SaRA's low-rank constraint: L_rank = λ·‖W ⊙ M‖_*, applied through its subgradient.

The nuclear norm's (sub)gradient at X = U Σ Vᵀ is U Vᵀ over the non-zero singular
values. Only the polar factor is needed, so it is computed from the eigen-decomposition
of the smaller Gram matrix, X·Q·Λ^(-1/2)·Qᵀ, which on CPU is 2-7x faster than a full
SVD; float32 is used when the matrix is well enough conditioned for it to be accurate
and float64 otherwise (SaRA's masked matrices are sparse and often ill-conditioned).
"""

from __future__ import annotations

import torch

MIN_SIDE = 64  # eligible matrices are 2-D with both sides > 64 (as in the paper's code)


def is_eligible(shape: tuple[int, ...] | torch.Size) -> bool:
    return len(shape) == 2 and min(shape) > MIN_SIDE


def nuclear_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), ord="nuc"))


def _polar_factor(tall: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float, bool]:
    """(U Vᵀ, ‖X‖_*, resolved) of a tall matrix from the eigh of its Gram in ``dtype``."""
    x = tall.to(dtype)
    eigenvalues, vectors = torch.linalg.eigh(x.T @ x)
    eps = torch.finfo(dtype).eps
    top = eigenvalues[-1].clamp_min(torch.finfo(dtype).tiny)
    keep = eigenvalues > top * eps * max(tall.shape)
    kept = eigenvalues[keep]
    # directions with σ_i²/σ_max² near eps are not resolved in this precision
    resolved = bool(kept.numel() == 0 or kept[0] >= top * eps**0.5)
    basis = vectors[:, keep]
    factor = ((x @ basis) * kept.rsqrt()) @ basis.T
    return factor, float(kept.sqrt().sum()), resolved


def nuclear_norm_subgradient(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(U Vᵀ in float32, ‖X‖_*): the gradient of the nuclear norm and its value."""
    if matrix.numel() == 0 or not bool(matrix.any()):
        return torch.zeros_like(matrix, dtype=torch.float32), 0.0
    wide = matrix.shape[0] < matrix.shape[1]
    tall = matrix.T if wide else matrix
    # near-square random-like matrices have σ_min ≈ 0 (Marchenko–Pastur): float32 is
    # tried first only when the aspect ratio makes it likely to resolve them
    resolved = False
    if tall.shape[0] >= 1.5 * tall.shape[1]:
        factor, value, resolved = _polar_factor(tall, torch.float32)
    if not resolved:
        factor, value, _ = _polar_factor(tall, torch.float64)
    factor = factor.float()
    return (factor.T if wide else factor), value


def sample_matrices(eligible: list[str], count: int, draw: int, seed: int) -> list[str]:
    """``count`` distinct eligible tensors for the ``draw``-th step: a function of
    (seed, draw) only, so every DDP rank draws the same ones and a resumed run only
    needs the draw counter."""
    if not eligible or count <= 0:
        return []
    generator = torch.Generator().manual_seed(seed * 1_000_003 + draw)
    order = torch.randperm(len(eligible), generator=generator)[: min(count, len(eligible))]
    return [eligible[i] for i in order.tolist()]
