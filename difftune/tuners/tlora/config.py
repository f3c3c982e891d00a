"""TLoRA options."""

from __future__ import annotations

import dataclasses

from ...errors import DifftuneError
from ...options import option
from ..base import AdapterConfig

RESIDUALS = ("tr", "lora")
DEFAULT_RESIDUAL_RANK = {"tr": 6, "lora": 4}  # the paper's TLoRA(2, 6) and TLoRA*(2, 4)
FORWARD_MODES = ("auto", "factored", "dense")


@dataclasses.dataclass
class TLoraConfig(AdapterConfig):
    """y = (W0·T + s·Δ)·x with T a tensor-ring matrix (identity at init) and Δ a residual
    (zero at init): a tensor ring (``residual="tr"``) or LoRA (``"lora"``, TLoRA*);
    s = alpha/√rank. ``transform_rank`` = 1 makes T a Kronecker product.
    """

    targets: str | list[str] = option("attn", "layers to adapt (preset, regex or list)")
    transform_rank: int = option(2, "tensor-ring rank R of the transform T (1 = Kronecker product)")
    residual: str = option("tr", "residual Δ: 'tr' (tensor ring) or 'lora' (TLoRA*)")
    rank: int | None = option(None, "rank of the residual (default 6 for 'tr', 4 for 'lora')")
    alpha: float = option(1.0, "residual scale numerator: s = alpha/√rank")
    num_cores: int = option(3, "cores D per tensor ring (the paper's D = 3)")
    identity_reg: float = option(0.0, "weight of Σ‖A_d − I/R‖_F pulling T's cores to the identity "
                                      "(0: off, as the released script)")
    forward_mode: str = option(
        "auto", "unmerged forward: factored (T applied to x without building it), dense (W0·T "
                "built per call), or auto (the cheaper by a flop estimate, per call)")

    def validate(self) -> None:
        def positive_int(name: str, value) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DifftuneError(f"tlora option '{name}' must be a positive integer, got {value!r}")

        positive_int("transform_rank", self.transform_rank)
        positive_int("num_cores", self.num_cores)
        if self.residual not in RESIDUALS:
            raise DifftuneError(f"tlora option 'residual' must be one of {', '.join(RESIDUALS)}, "
                                f"got {self.residual!r}")
        if self.rank is not None:
            positive_int("rank", self.rank)
        if not isinstance(self.alpha, (int, float)) or self.alpha == 0:
            raise DifftuneError(f"tlora option 'alpha' must be a non-zero number, got {self.alpha!r}")
        if not isinstance(self.identity_reg, (int, float)) or self.identity_reg < 0:
            raise DifftuneError(f"tlora option 'identity_reg' must be >= 0, got {self.identity_reg!r}")
        if self.forward_mode not in FORWARD_MODES:
            raise DifftuneError(f"tlora option 'forward_mode' must be one of {', '.join(FORWARD_MODES)}, "
                                f"got {self.forward_mode!r}")

    @property
    def effective_rank(self) -> int:
        return DEFAULT_RESIDUAL_RANK[self.residual] if self.rank is None else self.rank
