"""Student vs base one-step vs teacher: same noise for all three, the right images in each column."""

import numpy as np
import pytest
import torch
from conftest import randomize_adapter

import difftune
from difftune.families.sd import SDFamily
from difftune.hipa.evaluation import (
    COLUMNS,
    DifftuneMetrics,
    compare_with_teacher,
    evaluate_comparison,
    results_markdown,
)
from difftune.hipa.one_step import generate_one_step
from difftune.hipa.teacher import TeacherSettings, generate_teacher_samples

SIZE = 32
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def comparison_setup(tmp_path_factory):
    """A teacher cache of the base model, then the same pipeline with a random LoRA."""
    directory = tmp_path_factory.mktemp("teacher")
    pipe = SDFamily.build_tiny()
    settings = TeacherSettings(num_inference_steps=2, guidance_scale=1.0)
    cache = generate_teacher_samples(pipe, PROMPTS, directory, settings, height=SIZE, width=SIZE,
                                     show_progress=False)
    difftune.add_adapter(pipe.unet, "lora", rank=4)
    randomize_adapter(pipe.unet, std=0.2)
    return pipe, cache, compare_with_teacher(pipe, cache, batch_size=1)


def _one_step(pipe, prompt, noise):
    return np.asarray(generate_one_step(pipe, prompt, height=SIZE, width=SIZE, latents=noise[None],
                                        output_type="pil").images[0])


def test_columns_hold_student_base_and_teacher_from_the_same_noise(comparison_setup):
    pipe, cache, comparison = comparison_setup
    base = SDFamily.build_tiny()  # the base model, no adapter at all
    assert comparison.prompts == PROMPTS
    for i in range(len(PROMPTS)):
        noise = cache[i]["noise"]
        assert np.array_equal(np.asarray(comparison.base_one_step[i]), _one_step(base, PROMPTS[i], noise))
        assert np.array_equal(np.asarray(comparison.student[i]), _one_step(pipe, PROMPTS[i], noise))
        teacher = np.asarray(comparison.teacher[i], dtype=np.float64)
        stored = (cache[i]["image"].permute(1, 2, 0).numpy() + 1) * 127.5  # the fp16 training target
        assert np.abs(teacher - stored).max() <= 1.0
    assert difftune.get_adapter(pipe).scale == 1.0  # restored after the base column
    assert not np.array_equal(np.asarray(comparison.student[0]), np.asarray(comparison.base_one_step[0]))
    grid = comparison.side_by_side()
    assert len(grid) == 3 * len(PROMPTS) and grid[1] is comparison.base_one_step[0]


class MeanPixelMetrics:
    """A transparent stand-in: 'FID' = |mean pixel of set A − mean pixel of set B|, 'CLIP' = prompt count."""

    def fid(self, reference, generated):
        mean = lambda images: float(np.mean([np.asarray(im, dtype=np.float64).mean() for im in images]))  # noqa: E731
        return {"fid": abs(mean(reference) - mean(generated)), "extractor": "mean pixel"}

    def clip_score(self, images, prompts):
        assert len(images) == len(prompts)
        return float(len(prompts))


def test_metrics_per_column_against_teacher_or_real_reference(comparison_setup):
    _, _, comparison = comparison_setup
    metrics = MeanPixelMetrics()
    to_teacher = evaluate_comparison(comparison, metrics)
    assert list(to_teacher) == list(COLUMNS)
    assert "fid" not in to_teacher["teacher"]
    assert to_teacher["base one-step"]["fid"] == metrics.fid(comparison.teacher, comparison.base_one_step)
    assert to_teacher["one-step student"]["fid_reference"] == "teacher samples"
    real = comparison.teacher[::-1]
    to_real = evaluate_comparison(comparison, metrics, reference=real)
    assert to_real["teacher"]["fid"]["fid"] == pytest.approx(0.0)  # same images, other order
    assert to_real["teacher"]["clip_score"] == 2.0
    table = results_markdown(to_teacher)
    assert "| teacher | 2 | 2.000 | — | — | — |" in table
    assert "| base one-step | 2 | 2.000 |" in table and "mean pixel" in table


def test_compare_needs_an_adapter(comparison_setup):
    _, cache, _ = comparison_setup
    with pytest.raises(difftune.DifftuneError, match="no difftune adapter"):
        compare_with_teacher(SDFamily.build_tiny(), cache)


def test_teacher_cache_noise_drives_the_student(comparison_setup):
    pipe, _, comparison = comparison_setup
    other = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(99))
    assert not np.array_equal(_one_step(pipe, PROMPTS[0], other), np.asarray(comparison.student[0]))


def test_difftune_metrics_give_labelled_fid_and_clip_scores(comparison_setup, tiny_clip_dir):
    _, _, comparison = comparison_setup
    metrics = DifftuneMetrics(str(tiny_clip_dir), f"clip:{tiny_clip_dir}")
    results = evaluate_comparison(comparison, metrics, reference=comparison.teacher)
    assert results["teacher"]["fid"]["fid"] == pytest.approx(0.0, abs=1e-3)  # the reference itself
    student = results["one-step student"]
    assert student["fid"]["extractor"] == f"clip:{tiny_clip_dir}"
    assert student["fid"]["real_count"] == student["fid"]["generated_count"] == len(PROMPTS)
    assert all(0.0 <= row["clip_score"] <= 100.0 for row in results.values())
    assert f"clip:{tiny_clip_dir}" in results_markdown(results)
    without_fid = DifftuneMetrics(str(tiny_clip_dir))
    assert "fid" not in evaluate_comparison(comparison, without_fid)["base one-step"]
