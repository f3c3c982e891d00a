"""``train_summary.json``: what a training run cost, for benchmarks that compare methods.

Peak memory is CUDA's peak allocation during the training loop on a GPU (the counter is
reset when the loop starts), else the process's peak resident set size (model loading
included). The trainer passes the step time and the facts of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..io import write_text

SUMMARY_FILE = "train_summary.json"


def reset_peak_memory(device: torch.device) -> None:
    """Start counting peak memory here (CUDA only; a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max allocated during the training loop"
    try:
        import resource
    except ImportError:  # not on Unix
        return None, "not measured"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the training process"


def write_train_summary(output_dir: str | Path, device: torch.device, **facts: Any) -> Path:
    """Write ``facts`` plus peak memory and device to ``output_dir/train_summary.json``, atomically."""
    peak, kind = peak_memory(device)
    summary = {**facts, "peak_memory_bytes": peak, "peak_memory_kind": kind, "device": str(device)}
    if device.type == "cuda":
        summary["device_name"] = torch.cuda.get_device_name(device)
    text = json.dumps(summary, indent=2) + "\n"
    return write_text(Path(output_dir) / SUMMARY_FILE, text)
