"""SVFit options."""

from __future__ import annotations

import dataclasses

from ...errors import DifftuneError
from ...options import option
from ..base import AdapterConfig
from .functional import SVD_DTYPES

FORWARD_MODES = ("auto", "factored", "dense")


@dataclasses.dataclass
class SVFitConfig(AdapterConfig):
    """W = W0 + alpha · U_r diag(s − σ) V_rᵀ with only the r singular values s trained.

    ``rank`` unset chooses r per matrix as the smallest with Σσ² ≥ ``energy`` of the total
    (the paper's "over 99% of the information"); an int fixes r (capped at min(out, K));
    ``"full"`` keeps every singular value. ``alpha`` = 1 is the paper.
    """

    targets: str | list[str] = option("attn", "layers to adapt (preset, regex or list)")
    rank: int | str | None = option(
        None, "singular values trained per matrix: an int, 'full', or unset to choose by energy")
    energy: float = option(0.99, "with rank unset: keep the fewest top singular values holding "
                                 "this fraction of Σσ²")
    alpha: float = option(1.0, "multiplier on the trained change U_r diag(s − σ) V_rᵀ (1 = paper)")
    svd_dtype: str = option("float32", "precision of the one-time SVD: float32 or float64")
    forward_mode: str = option(
        "auto", "unmerged forward: factored W0x + U_r((s−σ)⊙V_rᵀx), dense (W built per call), "
                "or auto (the cheaper by a flop estimate, per call)")

    def validate(self) -> None:
        if isinstance(self.rank, str) and self.rank.isdigit():
            self.rank = int(self.rank)  # from a CLI flag or a file written by one
        if self.rank is not None and self.rank != "full" and (
                isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise DifftuneError(
                f"svfit option 'rank' must be a positive integer, 'full' or unset, got {self.rank!r}")
        if not isinstance(self.energy, (int, float)) or not 0.0 < self.energy <= 1.0:
            raise DifftuneError(f"svfit option 'energy' must be in (0, 1], got {self.energy!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha == 0:
            raise DifftuneError(f"svfit option 'alpha' must be a non-zero number, got {self.alpha!r}")
        if self.svd_dtype not in SVD_DTYPES:
            raise DifftuneError(f"svfit option 'svd_dtype' must be one of {', '.join(SVD_DTYPES)}, "
                                f"got {self.svd_dtype!r}")
        if self.forward_mode not in FORWARD_MODES:
            raise DifftuneError(f"svfit option 'forward_mode' must be one of {', '.join(FORWARD_MODES)}, "
                                f"got {self.forward_mode!r}")
