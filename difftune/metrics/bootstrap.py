"""Bootstrap intervals for benchmark means, resampling subjects and prompts.

A DreamBooth benchmark's score is a mean over subjects of a mean over prompts (each
prompt's value already averaged over its images and seeds). Both levels are samples
of what a user would bring, so the interval resamples both: subjects with replacement,
then, within each drawn subject, prompts with replacement (a two-stage bootstrap). A
comparison of two methods is paired: the same draws are applied to both, which for a
mean is the bootstrap of the per-(subject, prompt) difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A mean and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        """For a difference: the interval lies on one side of zero (significant at this level)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level}

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _as_table(scores: np.ndarray | list) -> np.ndarray:
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim == 1:
        table = table[:, None]  # one value per subject
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"scores must be a non-empty (subjects, prompts) table, got shape {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError("scores hold NaN or infinite values")
    return table


def resample_means(scores: np.ndarray | list, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = 0) -> np.ndarray:
    """``resamples`` bootstrap replicates of the mean of a (subjects, prompts) table."""
    table = _as_table(scores)
    subjects, prompts = table.shape
    rng = np.random.default_rng(seed)
    subject_draw = rng.integers(0, subjects, size=(resamples, subjects))
    prompt_draw = rng.integers(0, prompts, size=(resamples, subjects, prompts))
    drawn = table[subject_draw[..., None], prompt_draw]  # (resamples, subjects, prompts)
    return drawn.mean(axis=(1, 2))


def bootstrap_mean(scores: np.ndarray | list, level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = 0) -> Interval:
    """The mean of a (subjects, prompts) table with its two-stage percentile interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    table = _as_table(scores)
    replicates = resample_means(table, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return Interval(float(table.mean()), float(low), float(high), level)


def bootstrap_paired_difference(scores: np.ndarray | list, baseline: np.ndarray | list,
                                level: float = 0.95, resamples: int = DEFAULT_RESAMPLES,
                                seed: int = 0) -> Interval:
    """Mean of ``scores − baseline`` over the same (subject, prompt) cells, with its interval."""
    a, b = _as_table(scores), _as_table(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired tables differ in shape: {a.shape} vs {b.shape}")
    return bootstrap_mean(a - b, level, resamples, seed)


def bootstrap_grouped(statistics: Sequence[Callable[[np.ndarray], float]], sizes: Sequence[int],
                      level: float = 0.95, resamples: int = 200, seed: int = 0) -> Interval:
    """The mean over groups of a statistic of each group's items, with its two-stage interval.

    For a statistic of a whole set (a domain's FID over its images) there is no per-item value to
    average: ``statistics[g](indices)`` computes group g's statistic on those of its ``sizes[g]`` items.
    Each replicate draws groups with replacement, then items within each drawn group, and averages
    the drawn groups' statistics. A paired comparison passes statistics that return the difference of
    two methods on the same indices (the same prompts and seeds).

    A set statistic is biased on a resample: FID of a set holding repeated images is larger than the
    set's own (fewer distinct images, a smaller covariance), by more the fewer the images per feature
    dimension. The replicates are therefore shifted so that their mean is the point estimate before
    the percentiles are read (a bias-corrected percentile interval); for a plain mean the shift is
    only the resampling noise of the replicates' mean.
    """
    if len(statistics) != len(sizes) or not statistics:
        raise ValueError("one statistic per group, and at least one group")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    point = float(np.mean([statistic(np.arange(size)) for statistic, size in zip(statistics, sizes,
                                                                                 strict=True)]))
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for r in range(resamples):
        groups = rng.integers(0, len(sizes), size=len(sizes))
        replicates[r] = np.mean([statistics[g](rng.integers(0, sizes[g], size=sizes[g])) for g in groups])
    replicates += point - replicates.mean()
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return Interval(point, float(low), float(high), level)
