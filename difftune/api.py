"""The public adapter API: attach, train, save, load, scale, merge, remove.

Every function takes a denoiser (any ``nn.Module``); the ones that users call on
pipelines (`load_adapter`, `add_adapter`) also accept a diffusers pipeline and act on
its ``unet`` or ``transformer``. The attached adapter is kept on the module itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
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
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


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


def adapted_text_encoders(pipeline: Any) -> dict[str, nn.Module]:
    """A pipeline's text encoders that carry an adapter, by component name (none for a bare model).

    The subject trainer's ``--train_text_encoder`` attaches one beside the denoiser's, as
    diffusers' DreamBooth scripts do; the file, scale, merge and remove then cover both.
    """
    if isinstance(pipeline, nn.Module):
        return {}
    encoders = {name: getattr(pipeline, name, None) for name in TEXT_ENCODER_COMPONENTS}
    return {name: encoder for name, encoder in encoders.items()
            if isinstance(encoder, nn.Module) and has_adapter(encoder)}


def _adapted_modules(model: Any) -> list[nn.Module]:
    """The denoiser, then every adapted text encoder of a pipeline."""
    return [find_denoiser(model)[0], *adapted_text_encoders(model).values()]


def add_adapter(
    model: Any, method: str = "lora", targets: str | Sequence[str] | None = None, **options: Any
) -> Adapter:
    """Attach a new adapter; only its parameters stay trainable. Returns the adapter.

    ``targets`` is a preset (attn, attn-ff, conv, all), a regex on module names, or a
    list of them; it defaults to the method's own default. ``options`` are the method's
    (for LoRA: rank, alpha, dropout, init, use_dora).
    """
    return AdapterSpec(method, targets, options).attach(model)


def check_adapter(
    model: Any, method: str = "lora", targets: str | Sequence[str] | None = None, **options: Any
) -> dict[str, nn.Module]:
    """Refuse a bad method, option or target as `add_adapter` would, without attaching.

    Works on a model built on the meta device, so scripts can check before loading any
    weights. Returns the modules the adapter would attach to, by name.
    """
    return AdapterSpec(method, targets, options).check(model)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What adapter to attach: method, targets and the method's options, as one value.

    Built once (a trainer builds it from its flags); the method's config is made and validated
    when the spec is made, so checking it on a weightless model and attaching it later use the
    same config instead of building and checking it twice. ``targets`` None: the method's default.
    """

    method: str
    targets: str | tuple[str, ...] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        targets = self.targets
        if targets is not None and not isinstance(targets, str):
            targets = tuple(targets)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        options = dict(self.options)
        if targets is not None:
            options["targets"] = targets if isinstance(targets, str) else list(targets)
        config = get_method(self.method).config_class.from_options(self.method, options)
        object.__setattr__(self, "config", config)

    @property
    def adapter_class(self) -> type[Adapter]:
        return get_method(self.method)

    def with_targets(self, targets: str | Sequence[str] | None) -> AdapterSpec:
        """The same method and options on other modules (e.g. a text encoder's attention)."""
        return AdapterSpec(self.method, targets, self.options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"method", "adapter_options", "targets"}`` (as a checkpoint records them)."""
        targets = self.targets if self.targets is None or isinstance(self.targets, str) else [*self.targets]
        return {"method": self.method, "adapter_options": dict(self.options), "targets": targets}

    def check(self, model: Any) -> dict[str, nn.Module]:
        """The modules this adapter would attach to in ``model`` (may be a meta-device model);
        a target the method cannot adapt is refused."""
        denoiser, _ = find_denoiser(model)
        modules = resolve_targets(denoiser, self.config.targets)
        self.adapter_class.check_targets(modules)
        return modules

    def attach(self, model: Any) -> Adapter:
        """Attach a new adapter to ``model`` (see `add_adapter`); the model is left as it was on failure."""
        denoiser, _ = find_denoiser(model)
        if has_adapter(denoiser):
            raise DifftuneError(f"a '{get_adapter(denoiser).method}' adapter is already attached; "
                                "call difftune.remove_adapter() or merge_adapter() first")
        modules = self.check(denoiser)
        base_fingerprint = fingerprint(denoiser, modules)
        requires_grad_before = {name: p.requires_grad for name, p in denoiser.named_parameters()}
        denoiser.requires_grad_(False)
        try:
            adapter = self.adapter_class(denoiser, self.config, modules)
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


def _plan_adapter(
    denoiser: nn.Module, method: str, targets: str | Sequence[str] | None, options: dict[str, Any]
) -> tuple[type[Adapter], Any, dict[str, nn.Module]]:
    """Method class, validated config and target modules for an adapter."""
    spec = AdapterSpec(method, targets, options)
    return spec.adapter_class, spec.config, spec.check(denoiser)


def named_trainable_parameters(model: Any) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every trainable adapter parameter."""
    return list(get_adapter(model).named_trainable_parameters())


def trainable_parameters(model: Any) -> list[nn.Parameter]:
    """The parameters to hand to an optimizer."""
    return [p for _, p in named_trainable_parameters(model)]


def count_trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def save_adapter(model: Any, path: str | os.PathLike, base_model: str | None = None,
                 text_encoders: Mapping[str, nn.Module] | None = None) -> Path:
    """Write the adapter to ``path`` (a ``.safetensors`` file, or a folder for adapter.safetensors).

    The header records method, config, targets, the base-model fingerprint and the
    difftune version. Text-encoder adapters go into the same file, under their component
    names (``text_encoder.``): those of a pipeline are found by themselves, or pass
    ``text_encoders={"text_encoder": module}`` with a bare denoiser. The write is atomic.
    """
    denoiser, component = find_denoiser(model)
    adapter = get_adapter(denoiser)
    encoders = adapted_text_encoders(model) if text_encoders is None else dict(text_encoders)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DEFAULT_FILE_NAME
    if base_model is None:
        base_model = getattr(getattr(denoiser, "config", None), "_name_or_path", None)
    info = {
        "format_version": FORMAT_VERSION,
        "difftune_version": __version__,
        **_section_info(adapter),
        "component": component,
        "base_model": base_model,
    }
    sections = {component: adapter}
    if encoders:
        sections.update({name: get_adapter(encoder) for name, encoder in encoders.items()})
        info["text_encoders"] = {name: _section_info(sections[name]) for name in encoders}
    tensors = {f"{name}.{key}": value for name, each in sections.items()
               for key, value in each.adapter_state_dict().items()}
    bad = first_non_finite(tensors)
    if bad is not None:  # a diverged run must not leave a file that loads as NaN images
        raise DifftuneError(f"{path}: not saved: adapter tensor '{bad}' holds NaN or inf values")
    info[CHECKSUM_FIELD] = content_checksum(tensors, info)
    header = _merge_headers([each.extra_header(name) for name, each in sections.items()])
    # sorted keys: identical adapters give byte-identical files
    return write_safetensors(path, tensors,
                             {METADATA_KEY: json.dumps(info, default=str, sort_keys=True), **header})


def _section_info(adapter: Adapter) -> dict[str, Any]:
    """What rebuilds one component's adapter: method, config, targets, fingerprint, method extras."""
    return {"method": adapter.method, "config": adapter.config.to_dict(), "targets": adapter.target_names,
            "fingerprint": adapter.base_fingerprint, "extra": adapter.file_metadata()}


def _merge_headers(parts: list[dict[str, str]]) -> dict[str, str]:
    """Header entries of several components; JSON objects under one key (diffusers' per-component
    ``lora_adapter_metadata``) are merged, anything else must agree."""
    merged: dict[str, str] = {}
    for part in parts:
        for key, value in part.items():
            if key in merged and merged[key] != value:
                merged[key] = json.dumps({**json.loads(merged[key]), **json.loads(value)}, sort_keys=True)
            else:
                merged[key] = value
    return merged


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
    fingerprint, before touching the model. A file that also adapts text encoders
    (``--train_text_encoder``) attaches those too, so it needs the pipeline. A list of
    paths (one method) is combined into one adapter with ΔW = Σ scaleᵢ·ΔWᵢ, ``scale``
    then giving one weight per file; methods that can do this implement
    `Adapter.combine_files` (SaRA does). Returns the denoiser's adapter.

    A LoRA file made by another tool (kohya / A1111 / ComfyUI / diffusers / peft layout) is
    imported through diffusers' own key converters as a difftune LoRA (`difftune.export.importer`);
    a file with a key that maps to no module is refused whole.
    """
    single = isinstance(path, (str, os.PathLike))
    paths = [path] if single else list(path)
    if not paths:
        raise DifftuneError("load_adapter: no adapter path given")
    if single:
        from .export.importer import import_lora, is_foreign_file

        file_path = resolve_adapter_path(path)
        if is_foreign_file(file_path):  # a LoRA file of kohya, ComfyUI, diffusers, ...
            return import_lora(pipeline_or_model, file_path, float(scale))
    denoiser, _component = find_denoiser(pipeline_or_model)
    files, sources, encoder_sections = [], [], {}
    for each in paths:
        file_path = resolve_adapter_path(each)
        tensors, info = read_adapter_file(file_path)
        source = str(file_path)
        _check_method_config(info, source)
        for warning in check_fingerprint(denoiser, info["fingerprint"], source):
            warnings.warn(warning, stacklevel=2)
        sections = split_sections(tensors, info, source)
        encoder_sections = {name: (sections[name], section, _text_encoder(pipeline_or_model, name, source))
                            for name, section in info.get("text_encoders", {}).items()}
        for name, (_, section, encoder) in encoder_sections.items():
            _check_method_config(section, source, f"text_encoders.{name}.")
            for warning in check_fingerprint(encoder, section["fingerprint"], f"{source} ({name})"):
                warnings.warn(warning, stacklevel=2)
        files.append((sections[info["component"]], info))
        sources.append(source)
    adapter_class = get_method(files[0][1]["method"])
    if single:
        (local, info), source = files[0], sources[0]
    else:
        if any("text_encoders" in info for _, info in files):
            raise DifftuneError("load_adapter: files with text-encoder adapters cannot be combined: "
                                + ", ".join(s for s, (_, i) in zip(sources, files, strict=True)
                                            if "text_encoders" in i))
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

    attached: list[nn.Module] = []
    try:
        adapter = _attach_from_file(denoiser, info, local, source)
        attached.append(denoiser)
        for name, (tensors, section, encoder) in encoder_sections.items():
            _attach_from_file(encoder, section, tensors, f"{source} ({name})")
            attached.append(encoder)
    except BaseException:
        for module in attached:
            remove_adapter(module)
        raise
    if scale != 1.0:
        for module in attached:
            get_adapter(module).set_scale(scale)
    return adapter


def _check_method_config(section: dict[str, Any], source: str, where: str = "") -> None:
    try:
        get_method(section["method"]).config_class.from_options(section["method"], dict(section["config"]))
    except DifftuneError as err:
        raise AdapterFileError(f"{source}: header field '{where}method'/'{where}config': {err}") from None


def split_sections(tensors: dict[str, torch.Tensor], info: dict[str, Any],
                   source: str) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors by component (``unet``, ``text_encoder``, ...), their prefixes removed."""
    names = [info["component"], *info.get("text_encoders", {})]
    sections: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in tensors.items():
        name = next((n for n in names if key.startswith(f"{n}.")), None)
        if name is None:
            raise AdapterFileError(f"{source}: tensor '{key}' does not start with any of the file's "
                                   f"components ({', '.join(f'{n}.' for n in names)})")
        sections[name][key[len(name) + 1:]] = value
    return sections


def _text_encoder(pipeline: Any, name: str, source: str) -> nn.Module:
    encoder = None if isinstance(pipeline, nn.Module) else getattr(pipeline, name, None)
    if not isinstance(encoder, nn.Module):
        raise DifftuneError(f"{source}: the adapter also adapts the {name}; load it into a pipeline that has "
                            f"one (difftune.load_adapter(pipe, ...)), not into a bare model")
    return encoder


def _attach_from_file(model: nn.Module, section: dict[str, Any], tensors: dict[str, torch.Tensor],
                      source: str) -> Adapter:
    """Attach one component's adapter from its file section and load its tensors."""
    options = dict(section["config"])
    user_targets = options.pop("targets")
    adapter = add_adapter(model, section["method"], targets=section["targets"], **options)
    adapter.config.targets = user_targets
    try:
        adapter.check_file_metadata(section["extra"], source)
        adapter.load_file_tensors(tensors, source)
    except BaseException:
        remove_adapter(model)
        raise
    return adapter


def set_adapter_scale(model: Any, scale: float) -> None:
    """Strength at inference: W0 + scale·ΔW (0 gives the base model); text encoders too."""
    for module in _adapted_modules(model):
        get_adapter(module).set_scale(scale)


def merge_adapter(model: Any, unload: bool = True) -> nn.Module:
    """Fold the adapter into plain weights (same outputs, no extra cost).

    With ``unload=True`` (default) the adapter is removed for good and the model holds
    plain modules. With ``unload=False`` it stays attached in merged form and
    `unmerge_adapter` restores the exact original weights (kept in memory meanwhile).
    """
    denoiser, _ = find_denoiser(model)
    get_adapter(denoiser)  # a clear error when there is none
    for module in _adapted_modules(model):
        adapter = get_adapter(module)
        if unload:
            adapter.unload()
            _forget(module, adapter, restore_requires_grad=True)
        else:
            adapter.merge(keep_original=True)
    return denoiser


def unmerge_adapter(model: Any) -> None:
    for module in _adapted_modules(model):
        get_adapter(module).unmerge()


def remove_adapter(model: Any) -> nn.Module:
    """Restore the original modules and weights exactly, and their requires_grad flags
    (a pipeline's adapted text encoders too)."""
    denoiser, _ = find_denoiser(model)
    get_adapter(denoiser)  # a clear error when there is none
    for module in _adapted_modules(model):
        adapter = get_adapter(module)
        adapter.detach()
        _forget(module, adapter, restore_requires_grad=True)
    return denoiser


def _forget(denoiser: nn.Module, adapter: Adapter, restore_requires_grad: bool) -> None:
    if restore_requires_grad:
        for name, param in denoiser.named_parameters():
            param.requires_grad_(adapter.requires_grad_before.get(name, param.requires_grad))
    del denoiser.__dict__[_ADAPTER_ATTRIBUTE]
