"""LoRA options: the ones diffusers' DreamBooth LoRA scripts expose."""

from __future__ import annotations

import dataclasses

from ...errors import DifftuneError
from ...options import option
from ..base import AdapterConfig


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """Low-rank ΔW = (alpha / rank) · B·A on each target, as peft implements it.

    ``alpha`` defaults to ``rank`` (scale 1), which is what diffusers' scripts train.
    ``init="gaussian"`` matches them too; other peft initialisations (``True``,
    ``"pissa"``, ``"olora"``, ...) are passed through.
    """

    targets: str | list[str] = option("attn", "layers to adapt (preset, regex or list)")
    rank: int = option(4, "rank r of B·A")
    alpha: float | None = option(None, "scale numerator: ΔW = alpha/rank · B·A (default: rank)")
    dropout: float = option(0.0, "dropout on the LoRA branch input")
    init: str | bool = option("gaussian", "peft init_lora_weights: gaussian, true, pissa, olora, ...")
    use_dora: bool = option(False, "weight-decomposed LoRA (DoRA)")
    use_rslora: bool = option(False, "rank-stabilised scale alpha/sqrt(rank)")

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise DifftuneError(f"lora option 'rank' must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and self.alpha <= 0:
            raise DifftuneError(f"lora option 'alpha' must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise DifftuneError(f"lora option 'dropout' must be in [0, 1), got {self.dropout!r}")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)
