"""SaRA options (Hu et al., ICLR 2025): the paper's defaults, and ours where it is silent."""

from __future__ import annotations

import dataclasses

from ...errors import DifftuneError
from ...options import option
from ...sampled_gradients import check_path
from ..base import AdapterConfig


@dataclasses.dataclass
class SaraConfig(AdapterConfig):
    """Re-train the entries with |W0| < θ of the targeted tensors, in place.

    ``budget`` (ours) replaces θ by a global quantile: a count (≥ 1) or a fraction
    (< 1) of the targeted entries. ``progressive_step`` is a step number (≥ 1) or a
    fraction of training (< 1); 0 or None turns progressive adjustment off.
    """

    targets: str | list[str] = option(
        "all", "layers whose weights are candidates (default: every Linear/Conv of the denoiser)")
    threshold: float = option(2e-3, "train entries with |W0| < threshold (ignored when budget is set)")
    budget: float | None = option(
        None, "select this many entries instead (count ≥ 1, or fraction < 1); θ from a global quantile")
    lambda_rank: float = option(5e-3, "weight λ of the nuclear-norm low-rank loss (0 turns it off)")
    rank_samples: int = option(1, "eligible matrices (2-D, both sides > 64) penalised per step")
    progressive_step: float | None = option(
        0.5, "progressive adjustment at this step (≥ 1) or fraction of training (< 1); 0 or None: off")
    include_bias_norm: bool = option(
        False, "also select entries of the targeted layers' biases and of every norm layer")
    seed: int = option(0, "seed of the per-step draw of low-rank matrices")
    weight_gradients: str = option(
        "auto", "how Linear/Conv2d weights get their trained entries' gradient: auto (per layer, the "
        "faster of sampled and dense by a cost model measured on CPU; dense on other devices), measure "
        "(both timed once per layer shape), sampled (only the trained entries of XᵀδY), dense (the "
        "layer's whole weight gradient, then gathered)")

    def validate(self) -> None:
        check_path(self.weight_gradients, "sara option 'weight_gradients'")
        if not self.threshold > 0:
            raise DifftuneError(f"sara option 'threshold' must be positive, got {self.threshold!r}")
        if self.budget is not None and not self.budget > 0:
            raise DifftuneError(f"sara option 'budget' must be a count ≥ 1 or a fraction in (0, 1), "
                                f"got {self.budget!r}")
        if self.budget is not None and self.budget >= 1 and float(self.budget) != int(self.budget):
            raise DifftuneError(f"sara option 'budget' ≥ 1 is a count and must be whole, got {self.budget!r}")
        if self.lambda_rank < 0:
            raise DifftuneError(f"sara option 'lambda_rank' must be ≥ 0, got {self.lambda_rank!r}")
        if not isinstance(self.rank_samples, int) or self.rank_samples < 1:
            raise DifftuneError(f"sara option 'rank_samples' must be a positive integer, "
                                f"got {self.rank_samples!r}")
        if self.progressive_step is not None:
            step = self.progressive_step
            if step < 0 or (step >= 1 and float(step) != int(step)):
                raise DifftuneError(f"sara option 'progressive_step' must be a step ≥ 1, a fraction in "
                                    f"(0, 1), or 0/None for off, got {step!r}")

    def progressive_at(self, max_steps: int) -> int | None:
        """The optimizer step after which the mask shrinks, or None."""
        if not self.progressive_step:
            return None
        if self.progressive_step >= 1:
            return int(self.progressive_step)
        if max_steps <= 0:
            return None
        return max(1, round(self.progressive_step * max_steps))
