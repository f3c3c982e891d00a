"""TLoRA math (Tao et al., ICCV 2025, arXiv 2501.08727) as pure functions.

    y = (W0·T + s·Δ)·x,  s = alpha / √rank

* T (in × in) is a tensor-ring matrix (TRM): in = I_1···I_D and
  T[(i_1..i_D), (j_1..j_D)] = trace(A_1[i_1, j_1] ··· A_D[i_D, j_D]) with cores A_d of
  shape I_d × I_d × R × R. A_d[i, j] = δ_ij·𝟙/R gives T = I exactly in exact arithmetic
  (𝟙 the all-ones R × R matrix, 𝟙^D = R^(D−1)·𝟙, trace 𝟙 = R). R = 1 is a Kronecker
  product A_1 ⊗ ··· ⊗ A_D. T·x is applied without building T (`trm_apply`: the ring cut
  into two dense blocks, R² Kronecker products as two matrix products).
* Δ (out × K) is a tensor ring (TR) with output cores B_d (O_d × R × R) and input cores
  C_d (K_d × R × R): Δ[(o), (i)] = trace(B_1[o_1]···B_D[o_D]·C_1[i_1]···C_D[i_D]). With
  G[o, (x, y)] = (B_1···B_D)[o][x, y] and H[i, (x, y)] = (C_1···C_D)[i][y, x] this is
  Δ = G·Hᵀ, a rank-R² product: Δx costs R²(K + out) per vector and Δ is never dense.
  Or a LoRA residual Δ = B·A ("TLoRA*").

Indices are row-major (i_1 most significant), as ``torch.kron`` orders them.
"""

from __future__ import annotations

import math
from functools import cache

import torch

# The paper's factorisations (D = 3) of the SD/SDXL widths; the parameter counts it
# reports depend on them (320 = 4·8·10, not the more balanced 5·8·8).
PAPER_FACTORS: dict[int, tuple[int, int, int]] = {
    320: (4, 8, 10),
    640: (8, 8, 10),
    768: (8, 8, 12),
    1280: (8, 10, 16),
    2048: (8, 16, 16),
}


def factorize(n: int, num_factors: int = 3) -> tuple[int, ...]:
    """The paper's factors for its sizes (D = 3), `balanced_factors` for any other."""
    if num_factors == 3 and n in PAPER_FACTORS:
        return PAPER_FACTORS[n]
    return balanced_factors(n, num_factors)


@cache
def balanced_factors(n: int, num_factors: int) -> tuple[int, ...]:
    """n = I_1···I_D with non-decreasing factors minimising Σ I_d² (the TRM size per R²).

    Any n works: a prime p gives (1, …, 1, p), whose T is a dense p × p block.
    """
    if n < 1 or num_factors < 1:
        raise ValueError(f"cannot factor {n} into {num_factors} factors")

    def search(rest: int, slots: int, smallest: int) -> tuple[int, tuple[int, ...]] | None:
        if slots == 1:
            return (rest * rest, (rest,)) if rest >= smallest else None
        best = None
        factor = smallest
        while factor ** slots <= rest:
            if rest % factor == 0:
                found = search(rest // factor, slots - 1, factor)
                if found is not None:
                    candidate = (found[0] + factor * factor, (factor, *found[1]))
                    if best is None or candidate[0] < best[0]:
                        best = candidate
            factor += 1
        return best

    result = search(n, num_factors, 1)
    assert result is not None  # (1, …, 1, n) always qualifies
    return result[1]


# --- initialisation ----------------------------------------------------------------

def identity_trm_cores(factors: tuple[int, ...], rank: int, **tensor_kwargs) -> list[torch.Tensor]:
    """TRM cores with A_d[i, j, :, :] = δ_ij / R, so that T = I."""
    cores = []
    for size in factors:
        eye = torch.eye(size, **tensor_kwargs)
        cores.append(eye[:, :, None, None].expand(size, size, rank, rank) / rank)
    return [core.contiguous() for core in cores]


def init_tr_cores(out_factors: tuple[int, ...], in_factors: tuple[int, ...], rank: int,
                  generator: torch.Generator | None = None, **tensor_kwargs
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TR residual cores as the released code draws them: B_1 = 0 (so Δ = 0), B_d ~
    N(0, (√O_d / R²)²) for d ≥ 2, C_d ~ N(0, 1 / K_d)."""
    out_cores = []
    for d, size in enumerate(out_factors):
        core = torch.empty(size, rank, rank, **tensor_kwargs)
        if d == 0:
            core.zero_()
        else:
            core.normal_(0.0, math.sqrt(size) / rank ** 2, generator=generator)
        out_cores.append(core)
    in_cores = [torch.empty(size, rank, rank, **tensor_kwargs).normal_(
        0.0, 1.0 / math.sqrt(size), generator=generator) for size in in_factors]
    return out_cores, in_cores


# --- applying T and Δ without building them -------------------------------------------

def _contract_modes(state: torch.Tensor, names: list[str], contract: list[str],
                    matrix: torch.Tensor, new: list[tuple[str, int]]) -> tuple[torch.Tensor, list[str]]:
    """Contract the modes ``contract`` of ``state`` (its modes named ``names``) with
    ``matrix`` as one matrix product: rows of ``matrix`` are the contracted modes in that
    order, columns the ``new`` modes. The other modes keep their order, in front."""
    keep = [name for name in names if name not in contract]
    moved = state.permute([names.index(name) for name in keep + contract])
    out = moved.reshape(-1, matrix.shape[0]) @ matrix
    return (out.reshape(*moved.shape[:len(keep)], *[size for _, size in new]),
            keep + [name for name, _ in new])


def trm_block(cores: list[torch.Tensor]) -> torch.Tensor:
    """The dense block of a chain of TRM cores with its two end bonds left open:
    (∏ I_d, ∏ J_d, R, R), i.e. A_1[i_1, j_1]···A_k[i_k, j_k] for every (i), (j)."""
    state = cores[0]
    if len(cores) == 1:
        return state
    rank = state.shape[-1]
    names = ["i0", "j0", "left", "b1"]
    for d in range(1, len(cores)):
        core = cores[d]  # (I, J, b_d, b_{d+1})
        state, names = _contract_modes(
            state, names, [f"b{d}"], core.permute(2, 0, 1, 3).reshape(rank, -1),
            [(f"i{d}", core.shape[0]), (f"j{d}", core.shape[1]), (f"b{d + 1}", rank)])
    count = len(cores)
    order = [names.index(n) for n in [*[f"i{d}" for d in range(count)], *[f"j{d}" for d in range(count)],
                                      "left", f"b{count}"]]
    rows = math.prod(core.shape[0] for core in cores)
    return state.permute(order).reshape(rows, -1, rank, rank)


def trm_split(factors: tuple[int, ...]) -> int:
    """Where `trm_apply` cuts the ring into two blocks: the cut with the fewest flops,
    i.e. the smallest (I_1···I_k) + (I_{k+1}···I_D)."""
    return min(range(1, len(factors)), key=lambda k: math.prod(factors[:k]) + math.prod(factors[k:]))


def trm_apply(x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    """T·x for every row of ``x`` (N × in) without building T.

    The ring is cut into two dense blocks L (cores 1..k) and M (cores k+1..D), so that
    T = Σ_{a, b} L[:, :, a, b] ⊗ M[:, :, b, a], a sum of R² Kronecker products; x is
    multiplied by the R² slices of L, then of M: two matrix products of
    N·R²·in·(I_L + I_M) multiply-adds in all, through an N·in·R² intermediate.
    """
    n, width = x.shape
    if len(cores) == 1:
        return x @ torch.einsum("ijaa->ij", cores[0]).T
    split = trm_split(tuple(core.shape[0] for core in cores))
    left, right = trm_block(cores[:split]), trm_block(cores[split:])  # (I_L, J_L, a, b), (I_M, J_M, b, a)
    (rows_l, cols_l, rank, _), (rows_m, cols_m) = left.shape, right.shape[:2]
    pairs = rank * rank
    left_stack = left.permute(2, 3, 0, 1).reshape(pairs * rows_l, cols_l)          # rows (a, b, i_L)
    columns = x.reshape(n, cols_l, cols_m).transpose(0, 1).reshape(cols_l, n * cols_m)
    partial = (left_stack @ columns).reshape(pairs, rows_l, n, cols_m)
    partial = partial.permute(2, 1, 0, 3).reshape(n * rows_l, pairs * cols_m)        # cols (a, b, j_M)
    right_stack = right.permute(3, 2, 1, 0).reshape(pairs * cols_m, rows_m)         # rows (a, b, j_M)
    return (partial @ right_stack).reshape(n, width)


# `trm_apply`'s skinny products and its N·in·R² intermediate run at about half the speed
# per multiply-add of the big products of the dense path (measured on CPU for the SD
# widths); the automatic forward choice weighs its flops by this.
CONTRACTION_COST_FACTOR = 2.0


def trm_apply_flops(factors: tuple[int, ...], rank: int) -> int:
    """Multiply-adds of `trm_apply` per row."""
    width = math.prod(factors)
    if len(factors) == 1:
        return width * width
    split = trm_split(factors)
    return width * rank * rank * (math.prod(factors[:split]) + math.prod(factors[split:]))


def tr_chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """(∏ n_d, R, R): the matrix product of the cores' slices for every joint index."""
    chain = cores[0]
    rank = chain.shape[-1]
    for core in cores[1:]:
        chain = torch.einsum("pxa,nab->pnxb", chain, core).reshape(-1, rank, rank)
    return chain


def tr_factors(out_cores: list[torch.Tensor], in_cores: list[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, Hᵀ) with Δ = G·Hᵀ: G is out × R², Hᵀ is R² × K (a LoRA pair of rank R²)."""
    out_chain = tr_chain(out_cores)            # (out, x, y)
    in_chain = tr_chain(in_cores)              # (K, y, x)
    rank = out_chain.shape[-1]
    up = out_chain.reshape(out_chain.shape[0], rank * rank)
    down = in_chain.transpose(1, 2).reshape(in_chain.shape[0], rank * rank).T
    return up, down


# --- dense builders: merging, the dense forward path, tests ----------------------------

def trm_dense(cores: list[torch.Tensor]) -> torch.Tensor:
    """T as an in × in matrix (about in²·R² multiply-adds)."""
    if len(cores) == 1:
        return torch.einsum("ijaa->ij", cores[0])
    block = trm_block(cores[:-1])  # (I', J', a, b): the ring opened before the last core
    last = cores[-1]               # (I, J, b, a) closes it
    rank = last.shape[-1]
    state, _ = _contract_modes(block, ["i", "j", "a", "b"], ["b", "a"],
                               last.permute(2, 3, 0, 1).reshape(rank * rank, -1),
                               [("i_last", last.shape[0]), ("j_last", last.shape[1])])
    size = block.shape[0] * last.shape[0]
    return state.permute(0, 2, 1, 3).reshape(size, size)


def tr_dense(out_cores: list[torch.Tensor], in_cores: list[torch.Tensor]) -> torch.Tensor:
    """Δ as an out × K matrix."""
    up, down = tr_factors(out_cores, in_cores)
    return up @ down


def residual_scale(alpha: float, rank: int) -> float:
    """s = alpha / √rank."""
    return alpha / math.sqrt(rank)


def identity_distance(cores: list[torch.Tensor]) -> torch.Tensor:
    """Σ_d ‖A_d − δ·𝟙/R‖_F: how far the TRM cores are from their identity point."""
    total = cores[0].new_zeros(())
    for core in cores:
        size, rank = core.shape[0], core.shape[-1]
        identity = torch.eye(size, dtype=core.dtype, device=core.device)[:, :, None, None] / rank
        total = total + torch.linalg.vector_norm(core - identity)
    return total
