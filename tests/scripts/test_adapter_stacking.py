"""The stacking benchmark's plan of models and its table (the measured run is in docs/adapter-stacking.md)."""

import json
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmarks/adapter_stacking.py")


def test_every_method_in_each_role_alone_stacked_at_each_weight_and_trained_on_top(benchmark, tmp_path):
    weights = [(1.0, 1.0), (0.5, 1.0)]
    rows = benchmark.configurations(tmp_path, ["lora", "sara"], weights)
    by_name = {row["name"]: row for row in rows}
    assert len(by_name) == len(rows) == 1 + 2 + 2 + 2 * 2 * (len(weights) + 1)
    assert by_name["base"]["adapters"] == []
    for style in ("lora", "sara"):
        style_file = tmp_path / f"style_{style}" / "adapter.safetensors"
        assert by_name[f"style {style}"]["adapters"] == [(style_file, 1.0)]
        for subject in ("lora", "sara"):
            for ws, wj in weights:
                stacked = by_name[f"style {style} {ws:g} + subject {subject} {wj:g}"]
                assert stacked["adapters"] == [(style_file, ws),
                                               (tmp_path / f"subject_{subject}" / "adapter.safetensors", wj)]
            on_top = by_name[f"subject {subject} trained on style {style}"]
            # the subject trained on the style is measured with that style under it, at the weight it saw
            assert on_top["on_top"] and on_top["adapters"] == [
                (style_file, 1.0), (tmp_path / f"ontop_{style}_{subject}" / "adapter.safetensors", 1.0)]


def test_table_has_one_line_per_model_with_intervals_and_paired_changes_then_the_references(benchmark):
    report = {"rows": [{"name": "base", "subject_clip_i": 0.35, "subject_clip_i_interval": [0.3, 0.4],
                        "style_fid": 270.31, "style_fid_interval": [250.0, 290.5]},
                       {"name": "subject lora", "subject_clip_i": 0.5,
                        "subject_clip_i_interval": [0.45, 0.55], "clip_i_change": 0.15,
                        "clip_i_change_interval": [-0.01, 0.2], "clip_i_against": "base",
                        "style_fid": 280.0, "style_fid_interval": [260.0, 300.0]}],
              "subject_ceiling_clip_i": 0.765, "style_fid_floor": 60.0,
              "style_fid_floor_interval": [55.0, 66.0]}
    lines = benchmark.markdown(report).splitlines()
    assert lines[2] == "| base | 0.350 [0.300, 0.400] |  | 270.3 [250.0, 290.5] |  |"
    assert lines[3] == ("| subject lora | 0.500 [0.450, 0.550] | +0.150 [-0.010, +0.200] vs base | "
                        "280.0 [260.0, 300.0] |  |")
    assert lines[4].endswith("| 0.765 | | 60.0 [55.0, 66.0] | |") and len(lines) == 5


def test_rows_are_compared_with_the_adapter_they_add_to(benchmark, tmp_path):
    rows = {row["name"]: row for row in benchmark.configurations(tmp_path, ["lora", "sara"], [(0.5, 1.0)])}
    assert benchmark.compared_with(rows["base"]) == (None, None)
    assert benchmark.compared_with(rows["style sara"]) == (None, "base")
    assert benchmark.compared_with(rows["subject lora"]) == ("base", None)
    for name in ("style sara 0.5 + subject lora 1", "subject lora trained on style sara"):
        assert benchmark.compared_with(rows[name]) == ("subject lora", "style sara")


def test_documented_results_are_the_tables_rows():
    """docs/adapter-stacking.md's table is the benchmark's table of docs/results/adapter_stacking.json."""
    benchmark = load_script("benchmarks/adapter_stacking.py")
    report = json.loads((ROOT / "docs/results/adapter_stacking.json").read_text())
    assert benchmark.markdown(report) in (ROOT / "docs/adapter-stacking.md").read_text()
