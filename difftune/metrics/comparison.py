"""Method comparison for a multi-subject, multi-seed benchmark: means and paired differences
with two-stage bootstrap intervals (`difftune.metrics.bootstrap`).

The input is one row per (method, subject, seed, step, prompt) with that prompt's metric
values (already averaged over its images). Seeds are averaged within a (subject, prompt)
cell, so a cell is what is resampled with its subject; the paired difference to the
baseline uses the same cells, which every method must have.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .bootstrap import DEFAULT_RESAMPLES, bootstrap_mean, bootstrap_paired_difference

KEY_FIELDS = ("method", "subject", "seed", "step", "prompt")


def benchmark_rows(result: dict[str, Any], method: str, seed: int, step: int) -> list[dict[str, Any]]:
    """One row per prompt of an `evaluate_runs` result (a model on one subject): subject
    fidelity from the identifier prompts, and prior preservation (``pres``, ``pres_clip_i``,
    ``class_clip_t``) from the same prompt without the identifier, when it was drawn.

    ``prompt`` is the prompt's place in the list ("p03"): the same template across subjects,
    whose texts differ ("a sks dog on a beach", "a sks cat on a beach"); ``prompt_text`` is the text."""
    subject_prompts = result["per_prompt"]
    class_prompts = (result.get("class_prompts") or {}).get("per_prompt")
    if class_prompts is not None and len(class_prompts) != len(subject_prompts):
        raise ValueError(f"{len(subject_prompts)} subject prompts but {len(class_prompts)} class prompts")
    rows = []
    for index, entry in enumerate(subject_prompts):
        row = {"method": method, "subject": result["subject"], "seed": seed, "step": step,
               "prompt": f"p{index:02d}", "prompt_text": entry["prompt"], "clip_i": entry["clip_i"],
               "clip_t": entry["clip_t"],
               "dino": entry["dino"]}
        if class_prompts is not None:
            prior = class_prompts[index]
            row.update(pres=prior["dino"], pres_clip_i=prior["clip_i"], class_clip_t=prior["clip_t"])
        rows.append(row)
    return rows


def cell_table(rows: Sequence[dict[str, Any]], method: str, step: int, metric: str
               ) -> tuple[np.ndarray, list[str], list[str]]:
    """(subjects, prompts) table of one method at one step: each cell the mean over seeds."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row["method"] == method and row["step"] == step and row.get(metric) is not None:
            cells[(row["subject"], row["prompt"])].append(float(row[metric]))
    if not cells:
        raise ValueError(f"no rows of {method} at step {step} with {metric}")
    subjects = sorted({s for s, _ in cells})
    prompts = sorted({p for _, p in cells})
    missing = [(s, p) for s in subjects for p in prompts if (s, p) not in cells]
    if missing:
        raise ValueError(f"{method} at step {step}: {metric} missing for (subject, prompt) {missing[0]} "
                         f"and {len(missing) - 1} more")
    table = np.array([[np.mean(cells[(s, p)]) for p in prompts] for s in subjects])
    return table, subjects, prompts


def compare_methods(rows: Sequence[dict[str, Any]], metrics: Sequence[str], baseline: str,
                    level: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> list[dict]:
    """Per (method, step, metric): the mean with its interval and, for other methods than the
    baseline, the paired difference to the baseline at the same step with its interval."""
    for field in KEY_FIELDS:
        if any(field not in row for row in rows):
            raise ValueError(f"every row needs '{field}'")
    results = []
    for method, step in sorted({(r["method"], r["step"]) for r in rows}):
        for metric in metrics:
            table, subjects, prompts = cell_table(rows, method, step, metric)
            entry = {"method": method, "step": step, "metric": metric, "subjects": len(subjects),
                     "prompts": len(prompts), "mean": bootstrap_mean(table, level, resamples, seed).to_dict()}
            if method != baseline:
                base, base_subjects, base_prompts = cell_table(rows, baseline, step, metric)
                if (base_subjects, base_prompts) != (subjects, prompts):
                    raise ValueError(f"{method} and {baseline} at step {step} were scored on different "
                                     "subjects or prompts: no paired difference")
                difference = bootstrap_paired_difference(table, base, level, resamples, seed)
                entry["difference"] = {**difference.to_dict(), "significant": difference.excludes_zero}
            results.append(entry)
    return results


def comparison_markdown(results: Sequence[dict], baseline: str, digits: int = 3) -> str:
    """One table: mean [interval] per method and metric, and the paired difference to the baseline,
    marked * where its interval excludes zero."""
    metrics = list(dict.fromkeys(r["metric"] for r in results))
    header = ["method", "step", *metrics, *(f"Δ {m} vs {baseline}" for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key: dict[tuple[str, int], dict[str, dict]] = defaultdict(dict)
    for r in results:
        by_key[(r["method"], r["step"])][r["metric"]] = r

    def interval(value: dict) -> str:
        return f"{value['mean']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"

    for (method, step), entries in by_key.items():
        cells = [method, str(step)] + [interval(entries[m]["mean"]) for m in metrics]
        for m in metrics:
            diff = entries[m].get("difference")
            cells.append("–" if diff is None else interval(diff) + (" *" if diff["significant"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
