"""Adapter files checked before any heavy work: what `difftune.load_adapter` would refuse, without
a loaded model.

Scripts that load a pipeline and metric networks before the adapters they evaluate call this
first, with the denoiser built on the meta device (`model_factory.build_denoiser_on_meta`): a
corrupt, pickle, wrong-method or wrong-base file is then refused in seconds, not after the base
model has drawn its images. What needs the weights themselves (SVFit's singular values, the
modules another tool's LoRA keys map to) is still checked when the file loads.
"""

from __future__ import annotations

import os
from typing import Any

from .adapter_file import AdapterFile, resolve_adapter_path
from .api import _file_config, find_denoiser
from .lora_import import check_foreign_file, is_foreign_file


def check_adapter_file(path: str | os.PathLike, model: Any) -> None:
    """Refuse a file `difftune.load_adapter` would refuse for ``model`` (a denoiser, or a pipeline;
    weightless is enough): unreadable, pickle, damaged, an unknown method or bad options, or a
    fingerprint of another base model. Another tool's LoRA file is read and its keys checked."""
    file_path = resolve_adapter_path(path)
    if is_foreign_file(file_path):
        check_foreign_file(file_path)
        return
    file = AdapterFile.read(file_path, resolved=True)
    denoiser, _ = find_denoiser(model)
    _file_config(file.main, file.source)
    file.main.check_base(denoiser, file.source)
    for name, section in file.text_encoders.items():
        _file_config(section, file.source, f"text_encoders.{name}.")
