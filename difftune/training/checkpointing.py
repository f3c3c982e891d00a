"""Resumable checkpoints: small, atomic, and loadable as adapters on their own.

A checkpoint is a folder ``checkpoint-<step>`` holding only what training changes:

* ``adapter.safetensors``: the adapter file (``difftune.load_adapter`` reads the folder);
* ``adapter_training_state.safetensors``: the method's `training_state()` (masks, counters, ...);
* ``optimizer.safetensors``, ``scheduler.safetensors``: their ``state_dict()``;
* ``rng_state_<rank>.safetensors``: Python, NumPy and torch generators of each process;
* ``<name>.safetensors`` for each further state a trainer keeps (``ema``: the adapter's moving
  average, training/ema.py);
* ``trainer_state.json``: step, samples seen, seed and the run's settings;
* ``checkpoint_complete.json``: the name, size and SHA-256 of every other file, written last.

The base model is never saved. The folder is written as ``.checkpoint-<step>.tmp`` and
renamed when complete, so a run killed mid-save leaves the previous checkpoint intact
and no half-written one that ``latest`` could pick. A checkpoint counts (for ``latest``,
resuming and ``--checkpoints_total_limit``) only while its marker lists files that are all
there with their sizes; pruning renames a folder away before deleting it, and the next run
removes what a killed save or pruning left behind. Training states are safetensors files
(`save_state`): tensors as tensors, the rest of the structure as JSON in the header, so a
resumed run reads back exactly what was saved and nothing is ever unpickled; every state file
is read and checked when resuming, before the model loads. Resuming also compares every file with
the checksum written with it, so an edited ``trainer_state.json`` or a flipped bit inside a state
file (same size, header intact) is refused naming the file; ``latest`` then falls back, with a
warning, to the newest checkpoint that is intact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter_file import EXPERTS, read_adapter_file, read_safetensors, split_sections, write_safetensors
from ..api import find_denoiser, get_adapter, save_adapter
from ..errors import AdapterFileError, DifftuneError
from ..io import atomic_write, remove_stale_temp_files, user_write_errors

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


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (checkpoint files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**22):
            digest.update(block)
    return digest.hexdigest()


def _marker_digest(marker: dict[str, Any]) -> str:
    """SHA-256 of a marker's lists (sizes and checksums), so the marker vouches for itself too."""
    lists = {key: marker.get(key) for key in ("files", "sha256")}
    return hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()


def damaged_reason(path: Path) -> str | None:
    """Which file of a complete checkpoint no longer matches the checksum written with it (the marker
    itself included), else None. Checkpoints written before the checksums (a marker with neither
    ``sha256`` nor ``marker_sha256``) are taken as they are."""
    marker_file = path / COMPLETE_MARKER
    marker = json.loads(marker_file.read_text())
    vouched = "sha256" in marker or "marker_sha256" in marker
    if vouched and marker.get("marker_sha256") != _marker_digest(marker):
        return f"{marker_file} does not match the checksum written with it (edited or damaged)"
    digests = marker.get("sha256", {})
    for name, expected in sorted(digests.items()):
        if not (path / name).is_file() or file_digest(path / name) != expected:
            return f"{path / name} does not match the checksum written with it (edited or damaged)"
    return None


def resolve_checkpoint(output_dir: str | Path, spec: str | None) -> Path | None:
    """``latest`` → the newest intact checkpoint, a damaged newer one skipped with a warning (None when
    there is none); a path → checked, a damaged one refused naming the file."""
    if spec is None:
        return None
    if spec == "latest":
        checkpoints = list_checkpoints(output_dir)
        skipped = []
        for path in reversed(checkpoints):
            reason = damaged_reason(path)
            if reason is None:
                if skipped:
                    warnings.warn(f"--resume_from_checkpoint latest: resuming from {path.name}, the newest "
                                  f"intact checkpoint; skipped: {'; '.join(skipped)}", stacklevel=2)
                return path
            skipped.append(reason)
        if skipped:
            raise DifftuneError(f"--resume_from_checkpoint latest: every checkpoint in {output_dir} is "
                                f"damaged ({'; '.join(skipped)}); remove them to start afresh")
        return None
    path = Path(spec)
    if not path.is_dir():
        raise DifftuneError(f"--resume_from_checkpoint {spec}: no such checkpoint folder")
    reason = incomplete_reason(path)
    if reason is not None:
        raise DifftuneError(f"--resume_from_checkpoint {spec}: not a complete checkpoint: {reason}")
    reason = damaged_reason(path)
    if reason is not None:
        raise DifftuneError(f"--resume_from_checkpoint {spec}: a damaged checkpoint: {reason}")
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


# --- training states as safetensors ---------------------------------------------------------

STATE_KEY = "difftune_state"
STATE_FILES = ("adapter_training_state", "optimizer", "scheduler")  # plus rng_state_<rank>
STATE_SUFFIX = ".safetensors"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON structure for ``value``; its tensors go to ``tensors`` under numbered keys. Dicts keep
    their key types (optimizer states are keyed by int) and tuples stay tuples, so decoding gives
    back the very structure a ``load_state_dict`` expects."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach()  # written straight from its memory (write_safetensors), no copy
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a training state holds a {type(value).__name__}, which save_state cannot store")


def _decode(value: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"} and value["__tensor__"] in tensors:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
        return tuple(_decode(v, tensors, source) for v in value["__tuple__"])
    if set(value) == {"__dict__"} and all(isinstance(p, list) and len(p) == 2 for p in value["__dict__"]):
        return {_decode(k, tensors, source): _decode(v, tensors, source) for k, v in value["__dict__"]}
    raise DifftuneError(f"checkpoint file {source} is damaged: unexpected entry {json.dumps(value)[:80]}")


def save_state(path: Path, value: Any) -> None:
    """Write a training state (nested dicts, lists and tuples of tensors and plain values) atomically."""
    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(value, tensors))
    write_safetensors(path, tensors, {STATE_KEY: structure})


def load_state(path: Path, device: torch.device | str = "cpu") -> Any:
    """Read a `save_state` file; a missing or damaged one is a DifftuneError naming it."""
    if not path.is_file():
        raise DifftuneError(f"checkpoint file {path} is missing")
    try:
        tensors, metadata = read_safetensors(path)
        structure = json.loads(metadata[STATE_KEY])
    except (AdapterFileError, KeyError, json.JSONDecodeError) as err:
        raise DifftuneError(f"checkpoint file {path} is damaged (truncated or not a difftune state): "
                            f"{str(err).splitlines()[0]}") from None
    return _decode(structure, {k: v.to(device) for k, v in tensors.items()}, path)


def check_states(path: Path) -> None:
    """Read every state file of a checkpoint, so a damaged one fails before the model loads."""
    for name in STATE_FILES:
        load_state(path / f"{name}{STATE_SUFFIX}")
    for extra_file in sorted([*path.glob(f"rng_state_*{STATE_SUFFIX}"),
                              *path.glob(f"adapter_training_state_*{STATE_SUFFIX}")]):
        load_state(extra_file)


# --- save -----------------------------------------------------------------------------------

def estimated_bytes(trainable_parameters: int, max_train_steps: int, checkpointing_steps: int,
                    total_limit: int | None) -> int:
    """What a run's checkpoints and final adapter take at most: each checkpoint holds the adapter
    and two AdamW moments (fp32), the states and RNGs a little more."""
    kept = max_train_steps // checkpointing_steps
    if total_limit is not None:
        kept = min(kept, total_limit + 1)  # the newest is written before the oldest is removed
    per_checkpoint = 3 * 4 * trainable_parameters + 2**20
    return kept * per_checkpoint + 4 * trainable_parameters


def warn_if_disk_short(output_dir: str | Path, needed: int) -> None:
    """Warn before training when the output folder's disk has less free space than the run needs."""
    free = shutil.disk_usage(output_dir).free
    if needed > free:
        warnings.warn(f"{output_dir}: the checkpoints and adapter of this run take up to "
                      f"{needed / 2**30:.2f} GiB, the disk has {free / 2**30:.2f} GiB free; raise "
                      "--checkpointing_steps or set --checkpoints_total_limit", stacklevel=2)



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
    extra_states: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically on the main process; every process calls this.

    Adapted ``text_encoders`` are saved in the same adapter file, with their training state;
    ``extra_states`` (name → object with ``state_dict()``) each as ``<name>.safetensors``."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    staging = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        with user_write_errors(staging):  # e.g. a file system turned read-only: one line
            staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(staging / f"rng_state_{accelerator.process_index}{STATE_SUFFIX}", capture_rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_checkpoint(staging, final, step, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                          trainer_state=trainer_state, accelerator=accelerator, total_limit=total_limit,
                          base_model=base_model, text_encoders=text_encoders, extra_states=extra_states)
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(staging: Path, final: Path, step: int, *, model: Any, optimizer: Any, lr_scheduler: Any,
                      trainer_state: dict[str, Any], accelerator: Any, total_limit: int | None,
                      base_model: str | None, text_encoders: dict[str, Any] | None,
                      extra_states: dict[str, Any] | None = None) -> None:
    """The main process's part of `save_checkpoint`: every file into ``staging``, the marker last, the
    rename, then pruning. A write the machine refuses is one line; the older checkpoints stay."""
    output_dir = final.parent
    with user_write_errors(staging):
        denoiser, _ = find_denoiser(accelerator.unwrap_model(model))
        save_adapter(denoiser, staging, base_model=base_model, text_encoders=text_encoders or {})
        save_state(staging / f"adapter_training_state{STATE_SUFFIX}", get_adapter(denoiser).training_state())
        for name, encoder in (text_encoders or {}).items():
            save_state(staging / f"adapter_training_state_{name}{STATE_SUFFIX}",
                       get_adapter(encoder).training_state())
        save_state(staging / f"optimizer{STATE_SUFFIX}", optimizer.state_dict())
        save_state(staging / f"scheduler{STATE_SUFFIX}", lr_scheduler.state_dict())
        for name, holder in (extra_states or {}).items():
            save_state(staging / f"{name}{STATE_SUFFIX}", holder.state_dict())
        state = {**trainer_state, "step": step, "num_processes": accelerator.num_processes}
        atomic_write(staging / TRAINER_STATE,
                     lambda tmp: Path(tmp).write_text(json.dumps(state, indent=2, default=str)))
        written = [p for p in sorted(staging.iterdir()) if p.is_file()]
        marker = {"files": {p.name: p.stat().st_size for p in written},
                  "sha256": {p.name: file_digest(p) for p in written}}
        marker["marker_sha256"] = _marker_digest(marker)
        atomic_write(staging / COMPLETE_MARKER,  # last: the checkpoint counts from here on
                     lambda tmp: Path(tmp).write_text(json.dumps(marker, indent=1)))
        if final.exists():  # the same step saved by an earlier run that was then resumed
            _prune(final)
        staging.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                _prune(old)


# --- load -----------------------------------------------------------------------------------

def resume_point(output_dir: str | Path, spec: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """``--resume_from_checkpoint`` resolved: the checkpoint folder and its trainer state, or Nones."""
    path = resolve_checkpoint(output_dir, spec)
    if path is None:
        return None, None
    check_states(path)
    return path, read_trainer_state(path)


# trainer-state entries that checkpoints written before them lack, and the value they stood for then
ABSENT_MEANS = {"base_adapters": []}


def check_resume_fits(state: dict[str, Any], settings: dict[str, Any], path: str | Path) -> None:
    """A checkpoint resumes only the run that wrote it: every entry of ``settings`` (base model,
    method, options, targets, frozen base adapters, ...) must equal the one in its trainer ``state``."""
    for key, value in settings.items():
        if state.get(key, ABSENT_MEANS.get(key)) != value:
            raise DifftuneError(f"--resume_from_checkpoint {path}: it was trained with {key} "
                                f"{state.get(key)!r}, this run asks for {value!r}")


OPTIMIZATION_KEY = "optimization"  # trainer state: the settings its optimizer and schedule state hold
EXTENDABLE = ("max_train_steps", "num_train_epochs")  # a resumed run may train longer


def optimization_record(settings: Any, **more: Any) -> dict[str, Any]:
    """The optimisation settings (`OptimizerSettings` and ``more``, e.g. a text encoder's rate) a
    checkpoint records: what its optimizer and schedule state were made with."""
    record = {k: v for k, v in dataclasses.asdict(settings).items() if k not in EXTENDABLE}
    return {**record, **more}


def check_resume_optimization(state: dict[str, Any], record: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume with other optimisation settings than the checkpoint's, naming each: its
    optimizer and schedule state would keep the old learning rate (and betas, decay, schedule) while
    the run printed the new one. Checkpoints written before the record are taken as they are."""
    saved = state.get(OPTIMIZATION_KEY)
    if not isinstance(saved, dict):
        return
    changed = [f"--{name} {saved.get(name)} (this run: {value})" for name, value in record.items()
               if saved.get(name) != value]
    if changed:
        raise DifftuneError(f"--resume_from_checkpoint {path}: it was trained with {', '.join(changed)}; "
                            "its optimizer and schedule state hold those settings: resume with the same "
                            "values, or start a new run in another --output_dir")


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DifftuneError(f"checkpoint file {file} is damaged: {err}") from None
    if not isinstance(state, dict):
        raise DifftuneError(f"checkpoint file {file} is damaged: expected a JSON object")
    return state


def load_adapter_state(path: str | Path, model: Any, device: torch.device | str = "cpu",
                       text_encoders: dict[str, Any] | None = None) -> None:
    """Restore the adapter tensors, then the method's training state (before the optimizer's);
    the same for adapted ``text_encoders``, which the checkpoint must hold exactly."""
    path = Path(path)
    denoiser, _ = find_denoiser(model)
    tensors, info = read_adapter_file(path / "adapter.safetensors")
    sections = split_sections(tensors, info, str(path))
    further = {**info.get("text_encoders", {}), **info.get(EXPERTS, {})}  # text encoders, experts
    saved, wanted = set(further), set(text_encoders or {})
    if saved != wanted:
        raise DifftuneError(f"{path}: the checkpoint adapts {sorted(saved)} besides the denoiser, this run "
                            f"trains {sorted(wanted)} (--train_text_encoder and --expert must match the run "
                            "that wrote it)")
    modules = {info["component"]: (denoiser, info, f"adapter_training_state{STATE_SUFFIX}"),
               **{name: (encoder, further[name], f"adapter_training_state_{name}{STATE_SUFFIX}")
                  for name, encoder in (text_encoders or {}).items()}}
    for name, (module, section, state_file) in modules.items():
        adapter = get_adapter(module)
        adapter.check_file_metadata(section["extra"], str(path))
        adapter.load_file_tensors(sections[name], str(path), section["extra"])
        adapter.load_training_state(load_state(path / state_file, device))


def load_optimizer_state(path: str | Path, optimizer: Any, lr_scheduler: Any) -> None:
    """Optimizer and schedule state; one that does not fit this run's optimizer is named."""
    path = Path(path)
    for name, target in (("optimizer", optimizer), ("scheduler", lr_scheduler)):
        file = path / f"{name}{STATE_SUFFIX}"
        state = load_state(file)
        try:
            target.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise DifftuneError(f"checkpoint file {file} does not fit this run's {name}: {err}") from None


def load_extra_state(path: str | Path, name: str, holder: Any) -> None:
    """Restore a state `save_checkpoint` wrote from ``extra_states``; a missing or unfitting one
    is named."""
    file = Path(path) / f"{name}{STATE_SUFFIX}"
    try:
        holder.load_state_dict(load_state(file))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise DifftuneError(f"checkpoint file {file} does not fit this run: {err}") from None


def load_rng_state(path: str | Path, process_index: int) -> bool:
    """Restore this process's generators; False when the checkpoint has none for it."""
    file = Path(path) / f"rng_state_{process_index}{STATE_SUFFIX}"
    if not file.is_file():
        return False
    restore_rng_state(load_state(file))
    return True
