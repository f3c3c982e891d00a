"""SVFit math (Sun et al., arXiv 2409.05926) as pure functions.

W0 = U Σ Vᵀ. The top-r triplets become U_r diag(s) V_rᵀ with only s trainable
(initialised to σ_1..σ_r); the rest W_e = W0 − U_r Σ_r V_rᵀ stays frozen. Hence

    W = W_e + U_r diag(s) V_rᵀ = W0 + U_r diag(s − σ) V_rᵀ,

so the base weight is used as it is and only U_r (out × r) and V_rᵀ (r × K) are kept:
no dense W_e. The forward pass is either *factored*, W0·x + U_r((s − σ) ⊙ V_rᵀx), or
*dense*, (W0 + U_r diag(s − σ) V_rᵀ)·x; `cheaper_mode` picks by a flop estimate.
"""

from __future__ import annotations

import torch

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROBE_SEED = 0


def singular_triplets(matrix: torch.Tensor, svd_dtype: str = "float32"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``(U, σ, Vᵀ)`` of ``matrix`` computed in ``svd_dtype`` on its device.

    On CPU it runs on one thread: MKL's result depends on the thread count (the last bits
    of U, σ, V), so this keeps the training-time and load-time SVDs identical whatever
    threads a process uses (and on a busy machine one thread was also the faster).
    Deterministic for the same matrix, device, dtype and torch build; see docs/methods/svfit.md for
    what can differ elsewhere (near-equal singular values).
    """
    work = matrix.detach().to(SVD_DTYPES[svd_dtype])
    if work.device.type != "cpu":
        return torch.linalg.svd(work, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(work, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def rank_for_energy(sigma: torch.Tensor, energy: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ energy · Σ σ_i² (at least 1)."""
    squares = sigma.detach().double().square()
    total = squares.sum()
    cumulative = torch.cumsum(squares, 0)
    # tolerate the last bits of rounding in the cumulative sum for energy = 1.0
    reached = cumulative >= energy * total * (1 - 1e-12)
    return max(1, int(torch.nonzero(reached)[0]) + 1) if bool(reached.any()) else len(sigma)


def resolve_rank(shape: tuple[int, int], rank: int | str | None, energy: float,
                 sigma: torch.Tensor | None) -> int:
    """The per-matrix rank: a fixed int (capped at min(out, K)), "full", or by energy."""
    full = min(shape)
    if rank == "full":
        return full
    if isinstance(rank, int):
        return min(rank, full)
    if sigma is None:
        raise ValueError("choosing the rank by energy needs the singular values")
    return rank_for_energy(sigma, energy)


def delta_matrix(u: torch.Tensor, delta_s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """ΔW = U_r diag(s − σ) V_rᵀ (out × K)."""
    return (u * delta_s) @ vh


def factored_flops(positions: int, rank: int, out: int, k: int, training: bool) -> float:
    """Extra flops of W0·x + U_r(d ⊙ V_rᵀx) over the base layer (backward ≈ 2× forward)."""
    forward = positions * rank * (k + out)
    return forward * (3 if training else 1)


def dense_flops(positions: int, rank: int, out: int, k: int, training: bool) -> float:
    """Extra flops of building W0 + U_r diag(d) V_rᵀ per call: the build, and when training
    the weight gradient (positions·out·K) and its projection back onto d."""
    build = out * rank * k
    if not training:
        return build
    return 2 * build + positions * out * k


def cheaper_mode(positions: int, rank: int, out: int, k: int, training: bool) -> str:
    factored = factored_flops(positions, rank, out, k, training)
    return "factored" if factored <= dense_flops(positions, rank, out, k, training) else "dense"


def _probe_vectors(out: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(PROBE_SEED)
    left = torch.randn(out, 2, generator=generator, dtype=torch.float64)
    right = torch.randn(k, 2, generator=generator, dtype=torch.float64)
    return left, right


@torch.no_grad()
def probe(u: torch.Tensor, delta_s: torch.Tensor, vh: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2×2 sketch aᵀ·ΔW·b of ΔW with fixed random a, b, and a bound on its rounding scale.

    Invariant under the sign flips an SVD may choose (u_i, v_i → −u_i, −v_i); changes when
    the basis of near-equal singular values rotates, which is what it is for.
    """
    left, right = _probe_vectors(u.shape[0], vh.shape[1])
    ul = left.T @ u.double().cpu()          # 2 × r
    vr = vh.double().cpu() @ right          # r × 2
    d = delta_s.double().cpu()
    return (ul * d) @ vr, (ul.abs() * d.abs()) @ vr.abs()
