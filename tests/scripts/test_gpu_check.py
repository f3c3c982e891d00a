"""benchmarks/gpu_check.py: its CPU path (tiny sizes) end to end, the wheelhouse install, the budget."""

import json
import math
import subprocess

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("benchmarks/gpu_check.py")


def test_cpu_path_writes_json_and_table(gpu_check, tmp_path):
    out = tmp_path / "out"
    gpu_check.main([str(out), "--device", "cpu", "--steps", "1", "--skip", "main_job",
                    "--rows", "LoRA r4", "SaRA 5M", "full"])
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["tiny"] and report["device"] == "cpu"
    rows = report["training"]
    labels = {(r["arch"], r["label"]) for r in rows}
    assert labels == {(arch, label) for arch in ("sd15", "sdxl")
                      for label in ("LoRA r4", "SaRA 5M dense", "SaRA 5M sampled", "full fine-tuning")}
    for row in rows:
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["flops"] > 0 and row["trainable"] > 0
        assert "mfu" not in row  # no peak rate known for a CPU: no made-up MFU
    full = {r["arch"]: r for r in rows if r["method"] == "full"}
    lora = {r["arch"]: r for r in rows if r["label"] == "LoRA r4"}
    assert all(full[a]["trainable"] > 10 * lora[a]["trainable"] for a in full)
    sara = [r for r in rows if r["label"] == "SaRA 5M sampled"]
    assert all(r["trainable"] == 5000 for r in sara)
    assert report["sampling"]["images_per_s_1_steps"] > report["sampling"]["images_per_s_25_steps"] > 0
    assert math.isfinite(report["fid"]["fid"]) and report["fid"]["vectors"] == 200
    assert report["main_job"] == {"skipped": "--skip"}
    table = (out / "gpu_check.md").read_text()
    assert "| sdxl | 128 | SaRA 5M sampled |" in table and "FID of 200 × 64" in table


def test_an_exhausted_budget_skips_instead_of_guessing(gpu_check, tmp_path):
    out = tmp_path / "out"
    gpu_check.main([str(out), "--device", "cpu", "--budget_s", "0"])
    report = json.loads((out / "gpu_check.json").read_text())
    assert all(r["skipped"] == "time budget" for r in report["training"])
    for section in ("main_job", "sampling", "fid"):
        assert report[section] == {"skipped": "time budget"}


def test_wheelhouse_install_is_offline_and_checked(gpu_check, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no such folder"):
        gpu_check.install_from_wheelhouse(tmp_path / "missing")
    with pytest.raises(SystemExit, match="no difftune-"):
        gpu_check.install_from_wheelhouse(tmp_path)
    (tmp_path / "difftune-0.1.0-py3-none-any.whl").write_bytes(b"")
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    gpu_check.install_from_wheelhouse(tmp_path)
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "install"] and "--no-index" in command
    assert command[command.index("--find-links") + 1] == str(tmp_path) and command[-1] == "difftune"
