"""The public adapter API: attach, train, save, load, scale, merge, remove.

Every function takes a denoiser (any ``nn.Module``); the ones that users call on
pipelines (`load_adapter`, `add_adapter`) also accept a diffusers pipeline and act on
its ``unet`` or ``transformer``. The attached adapter is kept on the module itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ._version import __version__
from .adapter_file import (
    CHECKSUM_FIELD,
    DEFAULT_FILE_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    check_fingerprint,
    content_checksum,
    fingerprint,
    first_non_finite,
    read_adapter_file,
    resolve_adapter_path,
    write_safetensors,
)
from .errors import AdapterFileError, DifftuneError
from .targeting import resolve_targets
from .tuners import Adapter, get_method

_ADAPTER_ATTRIBUTE = "_difftune_adapter"
DENOISER_COMPONENTS = ("unet", "transformer")


def find_denoiser(obj: Any) -> tuple[nn.Module, str]:
    """Return ``(denoiser, component_name)`` for a pipeline or a model."""
    for component in DENOISER_COMPONENTS:
        denoiser = getattr(obj, component, None)
        if isinstance(denoiser, nn.Module) and not isinstance(obj, nn.Module):
            return denoiser, component
    if isinstance(obj, nn.Module):
        model = unwrap_model(obj)
        kind = type(model).__name__
        component = "unet" if "UNet" in kind else "transformer" if "Transformer" in kind else "model"
        return model, component
    raise DifftuneError(f"expected a diffusers pipeline or an nn.Module, got {type(obj).__name__}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Look through DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = model.module
        else:
            return model


def get_adapter(model: Any) -> Adapter:
    """The adapter attached to a model or pipeline; a clear error when there is none."""
    denoiser, _ = find_denoiser(model)
    adapter = denoiser.__dict__.get(_ADAPTER_ATTRIBUTE)
    if adapter is None:
        raise DifftuneError(f"no difftune adapter is attached to this {type(denoiser).__name__}")
    return adapter


def has_adapter(model: Any) -> bool:
    denoiser, _ = find_denoiser(model)
    return denoiser.__dict__.get(_ADAPTER_ATTRIBUTE) is not None


def add_adapter(
    model: Any, method: str = "lora", targets: str | Sequence[str] | None = None, **options: Any
) -> Adapter:
    """Attach a new adapter; only its parameters stay trainable. Returns the adapter.

    ``targets`` is a preset (attn, attn-ff, conv, all), a regex on module names, or a
    list of them; it defaults to the method's own default. ``options`` are the method's
    (for LoRA: rank, alpha, dropout, init, use_dora).
    """
    denoiser, _ = find_denoiser(model)
    if has_adapter(denoiser):
        raise DifftuneError(f"a '{get_adapter(denoiser).method}' adapter is already attached; "
                            "call difftune.remove_adapter() or merge_adapter() first")
    adapter_class, config, modules = _plan_adapter(denoiser, method, targets, options)

    base_fingerprint = fingerprint(denoiser, modules)
    requires_grad_before = {name: p.requires_grad for name, p in denoiser.named_parameters()}
    denoiser.requires_grad_(False)
    try:
        adapter = adapter_class(denoiser, config, modules)
        adapter.attach(modules)
    except BaseException:
        # leave the model as it was: undo a partial attach and the frozen flags
        if "adapter" in locals():
            with contextlib.suppress(Exception):
                adapter._detach()
        for name, param in denoiser.named_parameters():
            param.requires_grad_(requires_grad_before.get(name, param.requires_grad))
        raise
    adapter.base_fingerprint = base_fingerprint
    adapter.requires_grad_before = requires_grad_before
    denoiser.__dict__[_ADAPTER_ATTRIBUTE] = adapter
    return adapter


def check_adapter(
    model: Any, method: str = "lora", targets: str | Sequence[str] | None = None, **options: Any
) -> dict[str, nn.Module]:
    """Refuse a bad method, option or target as `add_adapter` would, without attaching.

    Works on a model built on the meta device, so scripts can check before loading any
    weights. Returns the modules the adapter would attach to, by name.
    """
    denoiser, _ = find_denoiser(model)
    return _plan_adapter(denoiser, method, targets, dict(options))[2]


def _plan_adapter(
    denoiser: nn.Module, method: str, targets: str | Sequence[str] | None, options: dict[str, Any]
) -> tuple[type[Adapter], Any, dict[str, nn.Module]]:
    """Method class, validated config and target modules for an adapter."""
    adapter_class = get_method(method)
    if targets is not None:
        options["targets"] = targets if isinstance(targets, str) else list(targets)
    config = adapter_class.config_class.from_options(method, options)
    modules = resolve_targets(denoiser, config.targets)
    adapter_class.check_targets(modules)
    return adapter_class, config, modules


def named_trainable_parameters(model: Any) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every trainable adapter parameter."""
    return list(get_adapter(model).named_trainable_parameters())


def trainable_parameters(model: Any) -> list[nn.Parameter]:
    """The parameters to hand to an optimizer."""
    return [p for _, p in named_trainable_parameters(model)]


def count_trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def save_adapter(model: Any, path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the adapter to ``path`` (a ``.safetensors`` file, or a folder for adapter.safetensors).

    The header records method, config, targets, the base-model fingerprint and the
    difftune version. The write is atomic.
    """
    denoiser, component = find_denoiser(model)
    adapter = get_adapter(denoiser)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DEFAULT_FILE_NAME
    if base_model is None:
        base_model = getattr(getattr(denoiser, "config", None), "_name_or_path", None)
    info = {
        "format_version": FORMAT_VERSION,
        "difftune_version": __version__,
        "method": adapter.method,
        "config": adapter.config.to_dict(),
        "component": component,
        "targets": adapter.target_names,
        "base_model": base_model,
        "fingerprint": adapter.base_fingerprint,
        "extra": adapter.file_metadata(),
    }
    tensors = {f"{component}.{key}": value for key, value in adapter.adapter_state_dict().items()}
    bad = first_non_finite(tensors)
    if bad is not None:  # a diverged run must not leave a file that loads as NaN images
        raise DifftuneError(f"{path}: not saved: adapter tensor '{bad}' holds NaN or inf values")
    info[CHECKSUM_FIELD] = content_checksum(tensors, info)
    # sorted keys: identical adapters give byte-identical files
    header = {METADATA_KEY: json.dumps(info, default=str, sort_keys=True), **adapter.extra_header(component)}
    return write_safetensors(path, tensors, header)


def read_adapter_info(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an adapter file (method, config, targets, fingerprint, ...)."""
    return read_adapter_file(path)[1]


def load_adapter(
    pipeline_or_model: Any,
    path: str | os.PathLike | Sequence[str | os.PathLike],
    scale: float | Sequence[float] = 1.0,
) -> Adapter:
    """Attach the adapter stored at ``path`` to a pipeline's denoiser (or a model).

    Refuses pickle files, damaged files and base models that do not match the
    fingerprint, before touching the model. A list of paths (one method) is combined
    into one adapter with ΔW = Σ scaleᵢ·ΔWᵢ, ``scale`` then giving one weight per file;
    methods that can do this implement `Adapter.combine_files` (SaRA does).
    """
    single = isinstance(path, (str, os.PathLike))
    paths = [path] if single else list(path)
    if not paths:
        raise DifftuneError("load_adapter: no adapter path given")
    denoiser, _component = find_denoiser(pipeline_or_model)
    files, sources = [], []
    for each in paths:
        file_path = resolve_adapter_path(each)
        tensors, info = read_adapter_file(file_path)
        source = str(file_path)
        try:
            get_method(info["method"]).config_class.from_options(info["method"], dict(info["config"]))
        except DifftuneError as err:
            raise AdapterFileError(f"{source}: header field 'method'/'config': {err}") from None
        for warning in check_fingerprint(denoiser, info["fingerprint"], source):
            warnings.warn(warning, stacklevel=2)
        prefix = f"{info['component']}."
        if any(not key.startswith(prefix) for key in tensors):
            raise AdapterFileError(f"{source}: tensor keys do not all start with '{prefix}'")
        files.append(({key[len(prefix):]: value for key, value in tensors.items()}, info))
        sources.append(source)
    adapter_class = get_method(files[0][1]["method"])
    if single:
        (local, info), source = files[0], sources[0]
    else:
        scales = [float(scale)] * len(files) if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(scales) != len(files):
            raise DifftuneError(f"load_adapter: {len(files)} files but {len(scales)} scales")
        kinds = {(info["method"], info["component"]) for _, info in files}
        if len(kinds) > 1:
            raise DifftuneError("load_adapter: cannot combine files of different methods/components: "
                                + ", ".join(f"{s} ({i['method']}, {i['component']})"
                                            for s, (_, i) in zip(sources, files, strict=True)))
        local, info = adapter_class.combine_files(files, scales, sources)
        source, scale = " + ".join(sources), 1.0

    options = dict(info["config"])
    user_targets = options.pop("targets")
    adapter = add_adapter(denoiser, adapter_class.method, targets=info["targets"], **options)
    adapter.config.targets = user_targets
    try:
        adapter.check_file_metadata(info["extra"], source)
        adapter.load_file_tensors(local, source)
    except BaseException:
        remove_adapter(denoiser)
        raise
    if scale != 1.0:
        adapter.set_scale(scale)
    return adapter


def set_adapter_scale(model: Any, scale: float) -> None:
    """Strength at inference: W0 + scale·ΔW (0 gives the base model)."""
    get_adapter(model).set_scale(scale)


def merge_adapter(model: Any, unload: bool = True) -> nn.Module:
    """Fold the adapter into plain weights (same outputs, no extra cost).

    With ``unload=True`` (default) the adapter is removed for good and the model holds
    plain modules. With ``unload=False`` it stays attached in merged form and
    `unmerge_adapter` restores the exact original weights (kept in memory meanwhile).
    """
    denoiser, _ = find_denoiser(model)
    adapter = get_adapter(denoiser)
    if unload:
        adapter.unload()
        _forget(denoiser, adapter, restore_requires_grad=True)
    else:
        adapter.merge(keep_original=True)
    return denoiser


def unmerge_adapter(model: Any) -> None:
    get_adapter(model).unmerge()


def remove_adapter(model: Any) -> nn.Module:
    """Restore the original modules and weights exactly, and their requires_grad flags."""
    denoiser, _ = find_denoiser(model)
    adapter = get_adapter(denoiser)
    adapter.detach()
    _forget(denoiser, adapter, restore_requires_grad=True)
    return denoiser


def _forget(denoiser: nn.Module, adapter: Adapter, restore_requires_grad: bool) -> None:
    if restore_requires_grad:
        for name, param in denoiser.named_parameters():
            param.requires_grad_(adapter.requires_grad_before.get(name, param.requires_grad))
    del denoiser.__dict__[_ADAPTER_ATTRIBUTE]
