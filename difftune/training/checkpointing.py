"""Resumable checkpoints: small, atomic, and loadable as adapters on their own.

A checkpoint is a folder ``checkpoint-<step>`` holding only what training changes:

* ``adapter.safetensors``: the adapter file (``difftune.load_adapter`` reads the folder);
* ``adapter_training_state.pt``: the method's `training_state()` (masks, counters, ...);
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``;
* ``rng_state_<rank>.pt``: Python, NumPy and torch generators of each process;
* ``trainer_state.json``: step, samples seen, seed and the run's settings;
* ``checkpoint_complete.json``: the name and size of every other file, written last.

The base model is never saved. The folder is written as ``.checkpoint-<step>.tmp`` and
renamed when complete, so a run killed mid-save leaves the previous checkpoint intact
and no half-written one that ``latest`` could pick. A checkpoint counts (for ``latest``,
resuming and ``--checkpoints_total_limit``) only while its marker lists files that are all
there with their sizes; pruning renames a folder away before deleting it, and the next run
removes what a killed save or pruning left behind. ``.pt`` files hold only tensors and
plain values and are read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter_file import atomic_write, read_adapter_file, remove_stale_temp_files
from ..api import find_denoiser, get_adapter, save_adapter
from ..errors import DifftuneError

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"
_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")


def checkpoint_step(path: Path) -> int | None:
    match = _NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir()
             if p.is_dir() and checkpoint_step(p) is not None and incomplete_reason(p) is None]
    return sorted(found, key=checkpoint_step)


def incomplete_reason(path: Path) -> str | None:
    """Why a checkpoint folder is not complete (no marker, a listed file missing or cut), else None."""
    try:
        listed = json.loads((path / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {COMPLETE_MARKER} (an interrupted save, or written by an older difftune)"
    if not isinstance(listed, dict):
        return f"{COMPLETE_MARKER} is damaged"
    for name, size in sorted(listed.items()):
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return f"{name} is missing or has another size than when it was saved"
    return None


def resolve_checkpoint(output_dir: str | Path, spec: str | None) -> Path | None:
    """``latest`` → the newest complete checkpoint (None when there is none); a path → checked."""
    if spec is None:
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(spec)
    if not path.is_dir():
        raise DifftuneError(f"--resume_from_checkpoint {spec}: no such checkpoint folder")
    reason = incomplete_reason(path)
    if reason is not None:
        raise DifftuneError(f"--resume_from_checkpoint {spec}: not a complete checkpoint: {reason}")
    return path


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete what interrupted saves left: staging and half-pruned checkpoint folders, and the
    temporary files of `atomic_write` in the output folder and its validation folder."""
    output_dir = Path(output_dir)
    stale = sorted(output_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")) if output_dir.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    for folder in (output_dir, output_dir / "validation"):
        stale += remove_stale_temp_files(folder)
    return stale


def _prune(path: Path) -> None:
    """Remove a checkpoint so that no kill leaves a part of it that still counts: rename, then delete."""
    doomed = path.with_name(f".{path.name}.pruned.tmp")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --- random number generators ---------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Every global generator a training step may touch (dropout, methods' own draws)."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- save -----------------------------------------------------------------------------------

def _torch_save(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(value, tmp))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: Any,
    optimizer: Any,
    lr_scheduler: Any,
    trainer_state: dict[str, Any],
    accelerator: Any,
    total_limit: int | None = None,
    base_model: str | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically on the main process; every process calls this."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _torch_save(staging / f"rng_state_{accelerator.process_index}.pt", capture_rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        denoiser, _ = find_denoiser(accelerator.unwrap_model(model))
        save_adapter(denoiser, staging, base_model=base_model)
        _torch_save(staging / "adapter_training_state.pt", get_adapter(denoiser).training_state())
        _torch_save(staging / "optimizer.pt", optimizer.state_dict())
        _torch_save(staging / "scheduler.pt", lr_scheduler.state_dict())
        state = {**trainer_state, "step": step, "num_processes": accelerator.num_processes}
        atomic_write(staging / TRAINER_STATE,
                     lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2, default=str)))
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        atomic_write(staging / COMPLETE_MARKER,  # last: the checkpoint counts from here on
                     lambda tmp: Path(tmp).write_text(json.dumps({"files": files}, indent=1)))
        if final.exists():  # the same step saved by an earlier run that was then resumed
            _prune(final)
        staging.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                _prune(old)
    accelerator.wait_for_everyone()
    return final


# --- load -----------------------------------------------------------------------------------

def resume_point(output_dir: str | Path, spec: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """``--resume_from_checkpoint`` resolved: the checkpoint folder and its trainer state, or Nones."""
    path = resolve_checkpoint(output_dir, spec)
    return path, (read_trainer_state(path) if path else None)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def _torch_load(path: Path, device: torch.device | str = "cpu") -> Any:
    if not path.is_file():
        raise DifftuneError(f"checkpoint file {path} is missing")
    return torch.load(path, map_location=device, weights_only=True)


def load_adapter_state(path: str | Path, model: Any, device: torch.device | str = "cpu") -> None:
    """Restore the adapter tensors, then the method's training state (before the optimizer's)."""
    path = Path(path)
    denoiser, _ = find_denoiser(model)
    adapter = get_adapter(denoiser)
    tensors, info = read_adapter_file(path / "adapter.safetensors")
    prefix = f"{info['component']}."
    adapter.check_file_metadata(info["extra"], str(path))
    adapter.load_file_tensors({k[len(prefix):]: v for k, v in tensors.items()}, str(path))
    adapter.load_training_state(_torch_load(path / "adapter_training_state.pt", device))


def load_optimizer_state(path: str | Path, optimizer: Any, lr_scheduler: Any) -> None:
    path = Path(path)
    optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    lr_scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))


def load_rng_state(path: str | Path, process_index: int) -> bool:
    """Restore this process's generators; False when the checkpoint has none for it."""
    file = Path(path) / f"rng_state_{process_index}.pt"
    if not file.is_file():
        return False
    restore_rng_state(_torch_load(file))
    return True
