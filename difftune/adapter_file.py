"""Adapter files: safetensors tensors plus JSON metadata in the header.

The header's ``difftune`` entry holds everything needed to rebuild the adapter on a
fresh base model (method, config, targeted modules) and to refuse the wrong base
(a fingerprint). Files are written atomically: a temporary file in the same folder,
then ``os.replace``, so an interrupted save never leaves a half-written adapter.
Pickle-based files are refused outright: loading one can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import AdapterFileError, BaseModelMismatchError

METADATA_KEY = "difftune"
FORMAT_VERSION = 1
DEFAULT_FILE_NAME = "adapter.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)``, then move the finished file over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write tensors (made contiguous, on CPU) with string metadata, atomically."""
    ready = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(ready, tmp, metadata=metadata))


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, else None."""
    for key in sorted(tensors):
        value = tensors[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def resolve_adapter_path(path: str | os.PathLike) -> Path:
    """Find the adapter file for a path (a file, or a folder holding adapter.safetensors)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path}: refusing a pickle-based file ({path.suffix}). difftune never unpickles "
            "files, since that can run arbitrary code; use a .safetensors adapter."
        )
    if path.is_dir():
        candidate = path / DEFAULT_FILE_NAME
        if not candidate.is_file():
            raise AdapterFileError(f"{path}: folder has no {DEFAULT_FILE_NAME}")
        return candidate
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the header metadata; a damaged file gives AdapterFileError."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {err}"
        ) from None
    return tensors, metadata


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return ``(tensors, difftune_metadata)`` for a difftune adapter file."""
    path = resolve_adapter_path(path)
    tensors, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        hint = (" It looks like a plain diffusers LoRA file: load it with "
                "pipe.load_lora_weights()." if any("lora" in k for k in tensors) else "")
        raise AdapterFileError(f"{path}: not a difftune adapter (no '{METADATA_KEY}' metadata).{hint}")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: damaged difftune metadata: {err}") from None
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: written by a newer difftune (format {info['format_version']}); upgrade difftune."
        )
    return tensors, info


# --- base-model fingerprint ---------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_hash(model: nn.Module) -> str | None:
    """Hash of a diffusers model's public config (private ``_`` keys such as the path ignored)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "items"):
        return None
    public = {k: _plain(v) for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(model: nn.Module, module_names: Iterable[str]) -> dict[str, Any]:
    """What identifies the base model an adapter belongs to."""
    modules = dict(model.named_modules())
    shapes = {}
    for name in module_names:
        weight = getattr(modules[name], "weight", None)
        shapes[name] = list(weight.shape) if weight is not None else None
    return {"class": type(model).__name__, "config_hash": config_hash(model), "shapes": shapes}


def check_fingerprint(model: nn.Module, expected: dict[str, Any], source: str) -> list[str]:
    """Raise BaseModelMismatchError naming the first mismatch; return soft warnings."""
    if expected["class"] != type(model).__name__:
        raise BaseModelMismatchError(
            f"{source}: adapter was trained on a {expected['class']}, "
            f"but the base model is a {type(model).__name__}"
        )
    modules = dict(model.named_modules())
    for name, shape in expected["shapes"].items():
        if name not in modules:
            raise BaseModelMismatchError(
                f"{source}: base model has no module '{name}' (the adapter targets it)")
        weight = getattr(modules[name], "weight", None)
        found = list(weight.shape) if weight is not None else None
        if found != shape:
            raise BaseModelMismatchError(
                f"{source}: module '{name}' has weight shape {found}, the adapter expects {shape}"
            )
    warnings = []
    current = config_hash(model)
    if expected.get("config_hash") and current and current != expected["config_hash"]:
        warnings.append(f"{source}: base model config differs from the training base "
                        "(all targeted shapes match, loading anyway)")
    return warnings
