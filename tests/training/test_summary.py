"""difftune.training.summary on its own: train_summary.json holds the run's facts and a peak memory
that is the process's own."""

import json
import resource

import torch

from difftune.training.summary import SUMMARY_FILE, peak_memory, write_train_summary


def test_summary_holds_the_facts_and_the_process_peak_memory(tmp_path):
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a peak only grows
    path = write_train_summary(tmp_path, torch.device("cpu"), method="lora", steps=4, step_time_s=0.5,
                               seed=3, mixed_precision="no")
    assert path == tmp_path / SUMMARY_FILE
    text = path.read_text()
    assert text.endswith("}\n")
    summary = json.loads(text)
    assert {k: summary[k] for k in ("method", "steps", "step_time_s", "seed", "mixed_precision")} == {
        "method": "lora", "steps": 4, "step_time_s": 0.5, "seed": 3, "mixed_precision": "no"}
    assert summary["device"] == "cpu" and "device_name" not in summary
    assert summary["peak_memory_kind"] == "peak RSS of the training process"
    assert summary["peak_memory_bytes"] >= floor > 0
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_FILE]  # no temporary file left


def test_a_second_summary_replaces_the_first(tmp_path):
    write_train_summary(tmp_path, torch.device("cpu"), steps=1)
    write_train_summary(tmp_path, torch.device("cpu"), steps=2)
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["steps"] == 2


def test_peak_memory_on_cpu_is_the_resident_set_peak():
    peak, kind = peak_memory(torch.device("cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert kind == "peak RSS of the training process" and 0 < peak <= after
