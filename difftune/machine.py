"""What a measurement ran on, so benchmark tables name their machine; how much memory it has."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes(device_type: str = "cpu") -> int | None:
    """Total memory of the training device (the first GPU's, else the machine's RAM); None if unknown."""
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on: GPU (if any), CPU model and threads, versions."""
    import torch

    cpu = cpu_name()
    info: dict[str, Any] = {}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info.update({"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "python": platform.python_version()})
    return info
