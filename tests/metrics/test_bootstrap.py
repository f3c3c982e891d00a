"""Bootstrap intervals against closed forms and scipy's own bootstrap."""

import numpy as np
import pytest
from scipy import stats

from difftune.metrics.bootstrap import (
    bootstrap_mean,
    bootstrap_paired_difference,
    resample_means,
)


def test_one_level_spread_matches_the_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 1.0, size=40)
    replicates = resample_means(values, resamples=20000, seed=1)
    # the bootstrap variance of a mean is the plug-in variance over n, exactly in expectation
    assert replicates.std() == pytest.approx(values.std(ddof=0) / np.sqrt(len(values)), rel=0.03)
    ours = bootstrap_mean(values, resamples=20000, seed=1)
    theirs = stats.bootstrap((values,), np.mean, n_resamples=20000, method="percentile",
                             random_state=2).confidence_interval
    width = theirs.high - theirs.low
    assert abs(ours.low - theirs.low) < 0.05 * width and abs(ours.high - theirs.high) < 0.05 * width
    assert ours.mean == pytest.approx(values.mean())


def test_two_stage_spread_matches_the_closed_form():
    """Var = (Var_s(subject means) + mean_s(within-subject variance) / P) / S, plug-in variances."""
    rng = np.random.default_rng(3)
    subjects, prompts = 6, 25
    table = rng.normal(size=(subjects, 1)) * 0.5 + rng.normal(size=(subjects, prompts)) * 2.0
    replicates = resample_means(table, resamples=40000, seed=4)
    expected = (table.mean(1).var() + (table.var(axis=1) / prompts).mean()) / subjects
    assert replicates.var() == pytest.approx(expected, rel=0.04)
    # resampling prompts too makes the interval wider than resampling subjects alone
    subjects_only = resample_means(table.mean(1), resamples=40000, seed=4)
    assert replicates.var() > subjects_only.var() * 1.2


def test_paired_difference_sees_a_small_consistent_gain():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(5, 25)) * 3.0  # subjects and prompts differ a lot
    better = base + 0.05 + rng.normal(size=base.shape) * 0.01
    paired = bootstrap_paired_difference(better, base)
    assert paired.mean == pytest.approx(0.05, abs=0.005) and paired.excludes_zero and paired.low > 0
    # the two means alone overlap widely: only pairing shows the difference
    alone_a, alone_b = bootstrap_mean(better), bootstrap_mean(base)
    assert alone_a.low < alone_b.high and alone_b.low < alone_a.high
    # a constant shift has a zero-width interval; no gain is not significant
    shifted = bootstrap_paired_difference(base + 0.2, base)
    assert shifted.low == pytest.approx(0.2) and shifted.high == pytest.approx(0.2)
    same = bootstrap_paired_difference(base + rng.normal(size=base.shape), base)
    assert not same.excludes_zero


def test_the_interval_covers_the_truth_at_about_its_level():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(600):
        sample = rng.normal(1.0, 1.0, size=30)
        interval = bootstrap_mean(sample, level=0.9, resamples=1000, seed=trial)
        covered += interval.low <= 1.0 <= interval.high
    assert 0.82 <= covered / 600 <= 0.95  # percentile intervals run a little narrow at n = 30


@pytest.mark.parametrize(("scores", "message"), [
    ([[1.0, np.nan]], "NaN"), (np.zeros((0, 3)), "non-empty"), (np.zeros((2, 2, 2)), "non-empty")])
def test_bad_tables_are_refused(scores, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_mean(scores)


def test_paired_tables_must_match_and_level_must_be_a_fraction():
    with pytest.raises(ValueError, match="differ in shape"):
        bootstrap_paired_difference(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([1.0, 2.0], level=95)


def test_grouped_bootstrap_of_a_set_statistic_matches_the_plain_one_for_a_mean():
    from difftune.metrics.bootstrap import bootstrap_grouped, bootstrap_mean

    rng = np.random.default_rng(3)
    table = rng.normal(size=(5, 40))
    grouped = bootstrap_grouped([lambda idx, row=row: float(row[idx].mean()) for row in table], [40] * 5,
                                resamples=4000, seed=1)
    plain = bootstrap_mean(table, resamples=4000, seed=2)
    assert grouped.mean == pytest.approx(table.mean())
    assert grouped.low == pytest.approx(plain.low, abs=0.03)
    assert grouped.high == pytest.approx(plain.high, abs=0.03)
    with pytest.raises(ValueError, match="one statistic per group"):
        bootstrap_grouped([], [])


def test_grouped_interval_of_a_biased_set_statistic_holds_its_point_estimate():
    """A statistic of a set's distinct items shrinks on a resample with repeats (as FID grows): about
    0.63 of the items are distinct, so unshifted replicates would lie far below the point estimate.
    The interval is moved back onto it, with its width kept."""
    from difftune.metrics.bootstrap import bootstrap_grouped

    rng = np.random.default_rng(4)
    groups = [rng.uniform(1, 2, size=30) for _ in range(4)]

    def distinct_sum(values):
        return lambda idx: float(values[np.unique(idx)].sum())

    interval = bootstrap_grouped([distinct_sum(v) for v in groups], [30] * 4, resamples=800, seed=0)
    point = np.mean([v.sum() for v in groups])
    assert interval.mean == pytest.approx(point)
    assert interval.low < point < interval.high
    assert interval.high - interval.low < 0.3 * point  # shifted, not widened to reach the point
