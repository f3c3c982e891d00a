"""Resumable checkpoints: small, atomic, and loadable as adapters on their own.

A checkpoint is a folder ``checkpoint-<step>`` holding only what training changes:

* ``adapter.safetensors``: the adapter file (``difftune.load_adapter`` reads the folder);
* ``adapter_training_state.pt``: the method's `training_state()` (masks, counters, ...);
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``;
* ``rng_state_<rank>.pt``: Python, NumPy and torch generators of each process;
* ``trainer_state.json``: step, samples seen, seed and the run's settings, written last.

The base model is never saved. The folder is written as ``.checkpoint-<step>.tmp`` and
renamed when complete, so a run killed mid-save leaves the previous checkpoint intact
and no half-written one that ``latest`` could pick. ``.pt`` files hold only tensors and
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

from ..adapter_file import atomic_write, read_adapter_file
from ..api import find_denoiser, get_adapter, save_adapter, split_sections
from ..errors import DifftuneError

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
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
             if p.is_dir() and checkpoint_step(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


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
    if not (path / TRAINER_STATE).is_file():
        raise DifftuneError(
            f"--resume_from_checkpoint {spec}: not a complete checkpoint (no {TRAINER_STATE})")
    return path


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete the temporary folders of saves that were interrupted."""
    output_dir = Path(output_dir)
    stale = sorted(output_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")) if output_dir.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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
    text_encoders: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically on the main process; every process calls this.

    Adapted ``text_encoders`` are saved in the same adapter file, with their training state."""
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
        save_adapter(denoiser, staging, base_model=base_model, text_encoders=text_encoders or {})
        _torch_save(staging / "adapter_training_state.pt", get_adapter(denoiser).training_state())
        for name, encoder in (text_encoders or {}).items():
            _torch_save(staging / f"adapter_training_state_{name}.pt", get_adapter(encoder).training_state())
        _torch_save(staging / "optimizer.pt", optimizer.state_dict())
        _torch_save(staging / "scheduler.pt", lr_scheduler.state_dict())
        state = {**trainer_state, "step": step, "num_processes": accelerator.num_processes}
        atomic_write(staging / TRAINER_STATE,
                     lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2, default=str)))
        if final.exists():  # the same step saved by an earlier run that was then resumed
            shutil.rmtree(final)
        staging.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
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


def load_adapter_state(path: str | Path, model: Any, device: torch.device | str = "cpu",
                       text_encoders: dict[str, Any] | None = None) -> None:
    """Restore the adapter tensors, then the method's training state (before the optimizer's);
    the same for adapted ``text_encoders``, which the checkpoint must hold exactly."""
    path = Path(path)
    denoiser, _ = find_denoiser(model)
    tensors, info = read_adapter_file(path / "adapter.safetensors")
    sections = split_sections(tensors, info, str(path))
    saved, wanted = set(info.get("text_encoders", {})), set(text_encoders or {})
    if saved != wanted:
        raise DifftuneError(f"{path}: the checkpoint adapts the text encoders {sorted(saved)}, this run "
                            f"trains {sorted(wanted)} (--train_text_encoder must match the run that "
                            "wrote it)")
    modules = {info["component"]: (denoiser, "adapter_training_state.pt"),
               **{name: (encoder, f"adapter_training_state_{name}.pt")
                  for name, encoder in (text_encoders or {}).items()}}
    for name, (module, state_file) in modules.items():
        adapter = get_adapter(module)
        adapter.load_adapter_state_dict(sections[name], str(path))
        adapter.load_training_state(_torch_load(path / state_file, device))


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
