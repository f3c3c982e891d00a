"""Method comparison rows → means and paired differences with intervals."""

import numpy as np
import pytest

from difftune.metrics.bootstrap import bootstrap_mean, bootstrap_paired_difference
from difftune.metrics.comparison import cell_table, compare_methods, comparison_markdown


def make_rows(gain: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    subject_level = {s: rng.normal() for s in "abcde"}
    rows = []
    for method, shift in (("lora", 0.0), ("sara", gain)):
        for subject in "abcde":
            for run_seed in range(3):
                for prompt in range(10):
                    value = subject_level[subject] + prompt * 0.1 + shift + rng.normal() * 0.01
                    rows.append({"method": method, "subject": subject, "seed": run_seed, "step": 100,
                                 "prompt": f"p{prompt:02d}", "clip_i": value, "clip_t": 30 + value})
    return rows


def test_cells_average_the_seeds():
    rows = make_rows()
    table, subjects, prompts = cell_table(rows, "sara", 100, "clip_i")
    assert table.shape == (5, 10) and subjects == list("abcde") and prompts[0] == "p00"
    direct = np.mean([r["clip_i"] for r in rows if r["method"] == "sara" and r["subject"] == "c"
                      and r["prompt"] == "p03"])
    assert table[2, 3] == pytest.approx(direct)


def test_means_and_differences_match_the_bootstrap_on_the_tables():
    rows = make_rows(gain=0.05)
    results = compare_methods(rows, ["clip_i", "clip_t"], baseline="lora", resamples=500)
    sara = next(r for r in results if r["method"] == "sara" and r["metric"] == "clip_i")
    lora = next(r for r in results if r["method"] == "lora" and r["metric"] == "clip_i")
    a, b = cell_table(rows, "sara", 100, "clip_i")[0], cell_table(rows, "lora", 100, "clip_i")[0]
    assert sara["mean"] == bootstrap_mean(a, resamples=500).to_dict()
    assert sara["difference"]["mean"] == pytest.approx(a.mean() - b.mean())
    assert sara["difference"]["low"] == bootstrap_paired_difference(a, b, resamples=500).low
    # subjects differ by about 1, the gain is 0.05: only the paired interval shows it
    assert sara["difference"]["significant"] and sara["difference"]["low"] > 0
    assert sara["mean"]["low"] < lora["mean"]["high"]
    assert "difference" not in lora
    none = compare_methods(make_rows(gain=0.0), ["clip_i"], baseline="lora", resamples=500)
    assert not next(r for r in none if r["method"] == "sara")["difference"]["significant"]


def test_markdown_marks_significant_differences():
    results = compare_methods(make_rows(gain=0.05), ["clip_i"], baseline="lora", resamples=300)
    table = comparison_markdown(results, "lora").splitlines()
    assert table[0] == "| method | step | clip_i | Δ clip_i vs lora |"
    sara_line = next(line for line in table if line.startswith("| sara"))
    assert sara_line.endswith(" * |") and "| lora | 100 |" in table[2] and table[2].endswith("| – |")


def test_missing_cells_and_unpaired_runs_are_refused():
    rows = make_rows()
    with pytest.raises(ValueError, match="missing for"):
        compare_methods([r for r in rows if not (r["method"] == "sara" and r["subject"] == "a"
                                                 and r["prompt"] == "p01")], ["clip_i"], "lora")
    with pytest.raises(ValueError, match="different subjects or prompts"):
        compare_methods([r for r in rows if not (r["method"] == "sara" and r["subject"] == "a")],
                        ["clip_i"], "lora")
    with pytest.raises(ValueError, match="every row needs 'step'"):
        compare_methods([{k: v for k, v in r.items() if k != "step"} for r in rows], ["clip_i"], "lora")
