"""The public adapter API: attach, train, save, load, scale, switch, merge, remove.

Every function takes a denoiser (any ``nn.Module``); the ones that users call on
pipelines (`load_adapter`, `add_adapter`) also accept a diffusers pipeline and act on
its ``unet`` or ``transformer``. The attached adapters are kept on the module itself.

A module holds any number of named adapters of any mix of methods (`difftune.adapter_set`): the
model computes W0 + Σ wᵢ·ΔWᵢ over the active ones, wᵢ each one's scale. An adapter attached without a
name is called ``default``, so code written for one adapter per model works as it did.
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

from torch import nn

from . import adapter_set
from .adapter_file import (
    DEFAULT_FILE_NAME,
    AdapterFile,
    AdapterSection,
    TokenEmbeddings,
    fingerprint,
    read_adapter_file,
    resolve_adapter_path,
)
from .errors import AdapterFileError, DifftuneError
from .families import FAMILIES, denoiser_components, expert_components, text_encoder_components
from .lora_import import is_foreign_file, read_foreign_lora
from .targeting import resolve_targets
from .tokens import prepare_token_loading
from .tuners import Adapter, AdapterConfig, get_method
from .tuners.base import DEFAULT_ADAPTER_NAME

_COMPONENT_ATTRIBUTE = "_difftune_component"
AdapterNames = str | Sequence[str]


def find_denoiser(obj: Any) -> tuple[nn.Module, str]:
    """Return ``(denoiser, component_name)`` for a pipeline or a model (the component a model family
    names its class by, or the one `name_component` gave it; other models by the kind of their class
    name, else ``model``). Of a pipeline with several denoisers (experts) the first that carries an
    adapter, else the first."""
    if not isinstance(obj, nn.Module):
        present = [(getattr(obj, name), name) for name in (*denoiser_components(), *expert_components())
                   if isinstance(getattr(obj, name, None), nn.Module)]
        for denoiser, component in present:
            if adapter_set.adapters_on(denoiser):
                return denoiser, component
        if present:
            return present[0]
    if isinstance(obj, nn.Module):
        model = unwrap_model(obj)
        if model.__dict__.get(_COMPONENT_ATTRIBUTE):
            return model, model.__dict__[_COMPONENT_ATTRIBUTE]
        kind = type(model).__name__
        known = {family.denoiser_class: family.denoiser_component for family in FAMILIES.values()}
        guessed = "unet" if "UNet" in kind else "transformer" if "Transformer" in kind else "model"
        return model, known.get(kind, guessed)
    raise DifftuneError(f"expected a diffusers pipeline or an nn.Module, got {type(obj).__name__}")


def name_component(model: nn.Module, component: str) -> nn.Module:
    """Record which pipeline component a bare denoiser is (``transformer_2``), for files saved from it."""
    model.__dict__[_COMPONENT_ATTRIBUTE] = component
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """Look through DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = model.module
        else:
            return model


def get_adapter(model: Any, name: str | None = None) -> Adapter:
    """The adapter called ``name`` on a model or pipeline's denoiser; without a name, the ``default`` one
    or the only one. A clear error when there is none."""
    denoiser, _ = find_denoiser(model)
    adapters = adapter_set.adapters_on(denoiser)
    if not adapters:
        raise DifftuneError(f"no difftune adapter is attached to this {type(denoiser).__name__}")
    if name is None:
        if DEFAULT_ADAPTER_NAME in adapters or len(adapters) == 1:
            return adapters.get(DEFAULT_ADAPTER_NAME) or next(iter(adapters.values()))
        raise DifftuneError(f"this {type(denoiser).__name__} holds several adapters "
                            f"({', '.join(adapters)}): name one")
    if name not in adapters:
        raise DifftuneError(f"no adapter named '{name}' on this {type(denoiser).__name__} "
                            f"(attached: {', '.join(adapters)})")
    return adapters[name]


def has_adapter(model: Any, name: str | None = None) -> bool:
    """Whether the denoiser holds any adapter (with ``name``: one of that name)."""
    denoiser, _ = find_denoiser(model)
    adapters = adapter_set.adapters_on(denoiser)
    return bool(adapters) if name is None else name in adapters


def adapter_view(model: Any) -> Adapter | adapter_set.AdapterSet:
    """What a model's adapters change, as one adapter: the adapter itself when it is the only one, else
    its active adapters as a set with ΔW = Σ wᵢ·ΔWᵢ (`adapter_set.AdapterSet`: what exports read)."""
    denoiser, _ = find_denoiser(model)
    adapters = adapter_set.adapters_on(denoiser)
    if len(adapters) == 1:
        return next(iter(adapters.values()))
    _require_adapters(denoiser)
    return adapter_set.AdapterSet(denoiser)


def list_adapters(model: Any) -> list[str]:
    """The names of the denoiser's adapters, in the order they were attached."""
    return list(adapter_set.adapters_on(find_denoiser(model)[0]))


def active_adapters(model: Any) -> list[str]:
    """The names of the denoiser's adapters the model uses now (`set_adapters`, `disable_adapters`)."""
    return [name for name, adapter in adapter_set.adapters_on(find_denoiser(model)[0]).items()
            if adapter.active]


def adapted_text_encoders(pipeline: Any) -> dict[str, nn.Module]:
    """A pipeline's text encoders that carry an adapter, by component name (none for a bare model).

    The subject trainer's ``--train_text_encoder`` attaches one beside the denoiser's, as
    diffusers' DreamBooth scripts do; the file, scale, merge and remove then cover both.
    """
    if isinstance(pipeline, nn.Module):
        return {}
    encoders = {name: getattr(pipeline, name, None) for name in text_encoder_components()}
    return {name: encoder for name, encoder in encoders.items()
            if isinstance(encoder, nn.Module) and has_adapter(encoder)}


def adapted_experts(pipeline: Any) -> dict[str, nn.Module]:
    """A pipeline's further denoisers (experts, `ModelFamily.expert_components`) that carry an adapter,
    besides the one `find_denoiser` gives."""
    if isinstance(pipeline, nn.Module):
        return {}
    main = find_denoiser(pipeline)[0]
    modules = {name: getattr(pipeline, name, None) for name in (*denoiser_components(), *expert_components())}
    return {name: module for name, module in modules.items()
            if isinstance(module, nn.Module) and module is not main and has_adapter(module)}


def _adapted_modules(model: Any) -> list[nn.Module]:
    """The denoiser, then every adapted text encoder and expert of a pipeline."""
    return [find_denoiser(model)[0], *adapted_text_encoders(model).values(), *adapted_experts(model).values()]


def add_adapter(
    model: Any, method: str = "lora", targets: str | Sequence[str] | None = None, name: str | None = None,
    **options: Any
) -> Adapter:
    """Attach a new adapter; only its parameters train (with the other adapters' as they were).
    Returns the adapter.

    ``targets`` is a preset (attn, attn-ff, conv, all), a regex on module names, or a
    list of them; it defaults to the method's own default. ``options`` are the method's
    (for LoRA: rank, alpha, dropout, init, use_dora). ``name`` (default ``default``) tells it apart
    from other adapters on the same model, of any method, on the same layers or others.
    """
    return AdapterSpec(method, targets, options).attach(model, name)


def _refuse_taken_name(model: nn.Module, name: str) -> None:
    adapters = adapter_set.adapters_on(model)
    if name in adapters:
        called = "" if name == DEFAULT_ADAPTER_NAME else f" as '{name}'"
        raise DifftuneError(f"a '{adapters[name].method}' adapter is already attached{called}; "
                            "call difftune.remove_adapter() or merge_adapter() first, or give the new one "
                            "another name (name=... / adapter_name=...)")
    if adapter_set.is_merged_set(model) or any(adapter.merged for adapter in adapters.values()):
        raise DifftuneError("the attached adapters are merged: call difftune.unmerge_adapter() before "
                            "attaching another")


def _install(denoiser: nn.Module, adapter: Adapter, attach: Any, name: str) -> Adapter:
    """Freeze the model but the other adapters' trainable tensors, ``attach(adapter)`` as ``name``, and
    keep the adapter on the model; on any failure the model is left as it was (a partial attach
    undone, the requires_grad flags restored)."""
    adapter.name = name
    base_fingerprint = fingerprint(denoiser, adapter.target_names)
    requires_grad_before = [(p, p.requires_grad) for p in denoiser.parameters()]
    others = [p for each in adapter_set.adapters_on(denoiser).values()
              for _, p in each.named_trainable_parameters() if p.requires_grad]
    denoiser.requires_grad_(False)
    try:
        attach(adapter)
    except BaseException:
        with contextlib.suppress(Exception):
            adapter._detach()
        for param, flag in requires_grad_before:
            param.requires_grad_(flag)
        raise
    for param in others:
        param.requires_grad_(True)
    adapter.base_fingerprint = base_fingerprint
    adapter_set.register(denoiser, adapter, requires_grad_before)
    return adapter


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
        self.adapter_class.check_targets(modules, self.config)
        return modules

    def weightless_parameter_count(self, model: Any) -> int | None:
        """How many parameters this adapter trains on ``model``, a weightless (meta-device) model, for a
        memory check before any weight loads: the method's count from shapes
        (`Adapter.weightless_parameter_count`), else an attach on the meta device, its new tensors made
        there too; None where only the weights decide (SaRA by threshold, SVFit by energy)."""
        import torch

        denoiser, _ = find_denoiser(model)
        modules = self.check(denoiser)
        try:
            count = self.adapter_class.weightless_parameter_count(denoiser, self.config, modules)
            if count is not None:
                return count
            with torch.device("meta"):
                adapter = self.adapter_class(denoiser, self.config, modules)
                adapter.attach(modules)
        except DifftuneError:
            return None
        return sum(param.numel() for _, param in adapter.named_trainable_parameters())

    def attach(self, model: Any, name: str | None = None) -> Adapter:
        """Attach a new adapter to ``model`` as ``name`` (see `add_adapter`); the model is left as it was
        on failure."""
        denoiser, _ = find_denoiser(model)
        name = name or DEFAULT_ADAPTER_NAME
        _refuse_taken_name(denoiser, name)
        modules = self.check(denoiser)
        adapter = self.adapter_class(denoiser, self.config, modules)
        return _install(denoiser, adapter, lambda each: each.attach(modules), name)


def named_trainable_parameters(model: Any) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every trainable adapter parameter (of every adapter not frozen)."""
    denoiser, _ = find_denoiser(model)
    _require_adapters(denoiser)
    return [pair for adapter in adapter_set.adapters_on(denoiser).values() if not adapter.frozen
            for pair in adapter.named_trainable_parameters()]


def trainable_parameters(model: Any) -> list[nn.Parameter]:
    """The parameters to hand to an optimizer."""
    return [p for _, p in named_trainable_parameters(model)]


def count_trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def save_adapter(model: Any, path: str | os.PathLike, base_model: str | None = None,
                 text_encoders: Mapping[str, nn.Module] | None = None,
                 token_embeddings: TokenEmbeddings | None = None, name: str | None = None) -> Path:
    """Write the adapter to ``path`` (a ``.safetensors`` file, or a folder for adapter.safetensors).

    The header records method, config, targets, the base-model fingerprint and the
    difftune version, and the frozen adapters on the model it was trained on top of (`Adapter.freeze`:
    their method, weight, file and a hash of their tensors; loading it without them warns).
    Text-encoder adapters go into the same file, under their component names (``text_encoder.``):
    those of a pipeline are found by themselves, or pass
    ``text_encoders={"text_encoder": module}`` with a bare denoiser. Further adapted denoisers (experts:
    ``transformer_2``) go into the same file too, found the same way or among ``text_encoders``.
    ``token_embeddings`` adds new tokens' embeddings (pivotal tuning, difftune.training.pivotal;
    `difftune.tokens`). The write is atomic. ``name`` picks one of several adapters (default:
    ``default``, or the only one); the text encoders' and experts' adapters of the same name go with it.
    """
    denoiser, component = find_denoiser(model)
    adapter = get_adapter(denoiser, name)
    if text_encoders is None:
        encoders = {**adapted_text_encoders(model), **adapted_experts(model)}
    else:
        encoders = dict(text_encoders)
    encoders = {part: encoder for part, encoder in encoders.items() if has_adapter(encoder, adapter.name)}
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DEFAULT_FILE_NAME
    if base_model is None:
        base_model = getattr(getattr(denoiser, "config", None), "_name_or_path", None)
    adapters = {component: adapter,
                **{part: get_adapter(encoder, adapter.name) for part, encoder in encoders.items()}}
    headers = _merge_headers([each.extra_header(name) for name, each in adapters.items()])
    file = AdapterFile(component=component, base_model=base_model, extra_header=headers,
                       sections={name: each.file_section() for name, each in adapters.items()},
                       token_embeddings=token_embeddings,
                       experts=tuple(name for name in encoders if name in expert_components()),
                       base_adapters=adapter_set.base_adapter_records(denoiser, adapter))
    return file.write(path)


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
    adapter_name: str | None = None,
) -> Adapter:
    """Attach the adapter stored at ``path`` to a pipeline's denoiser (or a model).

    Refuses pickle files, damaged files and base models that do not match the
    fingerprint, before touching the model. A file that also adapts text encoders
    (``--train_text_encoder``) attaches those too, and one with new token embeddings
    (``--train_token_embedding``) adds its tokens to the tokenizers; both need the pipeline. A list of
    paths (one method) is combined into one adapter with ΔW = Σ scaleᵢ·ΔWᵢ, ``scale``
    then giving one weight per file; methods that can do this implement
    `Adapter.combine_files` (SaRA does). Returns the denoiser's adapter.

    A LoRA file made by another tool (kohya / A1111 / ComfyUI / diffusers / peft layout) is
    read through diffusers' own key converters as a difftune LoRA file (`difftune.lora_import`) and
    attached like one; a file with a key that maps to no module is refused whole.

    ``adapter_name`` (default ``default``) attaches it beside adapters already there (of any method),
    as diffusers' ``load_lora_weights(..., adapter_name=)`` does; `set_adapters` then weighs them.
    """
    adapter_name = adapter_name or DEFAULT_ADAPTER_NAME
    single = isinstance(path, (str, os.PathLike))
    paths = [path] if single else list(path)
    if not paths:
        raise DifftuneError("load_adapter: no adapter path given")
    files: list[AdapterFile] = []
    for each in paths:
        file_path = resolve_adapter_path(each)
        if single and is_foreign_file(file_path):  # a LoRA file of kohya, ComfyUI, diffusers, ...
            if any(adapter_set.adapters_on(module) for module in _adapted_modules(pipeline_or_model)):
                raise DifftuneError(f"{file_path}: another tool's LoRA file is read through diffusers' "
                                    "loader, into a pipeline that holds no adapter yet: load it first, then "
                                    "the others")
            files.append(read_foreign_lora(pipeline_or_model, file_path))
        else:
            files.append(AdapterFile.read(file_path, resolved=True))
    denoiser = _file_denoiser(pipeline_or_model, files[0].component)
    # every file checked (config, base model, text encoders present) before the model is touched
    plans: list[tuple[type[Adapter], AdapterConfig]] = []
    encoders: dict[str, tuple[nn.Module, AdapterSection, type[Adapter], AdapterConfig]] = {}
    for file in files:
        plans.append(_file_config(file.main, file.source))
        for warning in file.main.check_base(denoiser, file.source):
            warnings.warn(warning, stacklevel=2)
        further = [("text_encoders", file.text_encoders), ("experts", file.expert_sections)]
        for field, name, section in ((f, n, s) for f, sections in further for n, s in sections.items()):
            encoder = _text_encoder(pipeline_or_model, name, file.source)
            encoders[name] = (encoder, section, *_file_config(section, file.source, f"{field}.{name}."))
            for warning in section.check_base(encoder, f"{file.source} ({name})"):
                warnings.warn(warning, stacklevel=2)
    add_tokens = None
    if single:
        (adapter_class, config), section, source = plans[0], files[0].main, files[0].source
        if files[0].token_embeddings is not None:
            add_tokens = prepare_token_loading(pipeline_or_model, files[0].token_embeddings, source)
    else:
        adapter_class, section, source, scale = _combine(files, scale)
        _, config = _file_config(section, source, adapter_class=adapter_class)

    for module in (denoiser, *(encoder for encoder, *_ in encoders.values())):
        _refuse_taken_name(module, adapter_name)
    for file in files:
        for line in adapter_set.base_adapter_warnings(denoiser, file.base_adapters, file.source):
            warnings.warn(line, stacklevel=2)
    attached: list[nn.Module] = []
    try:
        adapter = _attach_from_file(denoiser, adapter_class, config, section, source, adapter_name)
        attached.append(denoiser)
        for name, (encoder, each, encoder_class, encoder_config) in encoders.items():
            _attach_from_file(encoder, encoder_class, encoder_config, each, f"{source} ({name})",
                              adapter_name)
            attached.append(encoder)
        if add_tokens is not None:
            add_tokens()
    except BaseException:
        for module in attached:
            delete_adapter(module, adapter_name)
        raise
    for module in attached:
        get_adapter(module, adapter_name).source = source
        if scale != 1.0:
            get_adapter(module, adapter_name).set_scale(scale)
    return adapter


def _combine(files: list[AdapterFile], scale: float | Sequence[float]
             ) -> tuple[type[Adapter], AdapterSection, str, float]:
    """Several files of one method and component as one section (`Adapter.combine_files`): its
    method, the section, the joined source names, and the scale left to apply (1)."""
    sources = [file.source for file in files]
    whole = [file.source for file in files if file.text_encoders or file.experts or file.token_embeddings]
    if whole:
        raise DifftuneError("load_adapter: files with text-encoder adapters cannot be combined, nor files "
                            "with token embeddings: " + ", ".join(whole))
    scales = [float(scale)] * len(files) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(files):
        raise DifftuneError(f"load_adapter: {len(files)} files but {len(scales)} scales")
    if len({(file.main.method, file.component) for file in files}) > 1:
        raise DifftuneError("load_adapter: cannot combine files of different methods/components: "
                            + ", ".join(f"{file.source} ({file.main.method}, {file.component})"
                                        for file in files))
    adapter_class = get_method(files[0].main.method)
    section = adapter_class.combine_files([file.main for file in files], scales, sources)
    return adapter_class, section, " + ".join(sources), 1.0


def _file_config(section: AdapterSection, source: str, where: str = "",
                 adapter_class: type[Adapter] | None = None) -> tuple[type[Adapter], AdapterConfig]:
    """The method class and validated config a file section names; a bad one is the file's fault."""
    try:
        adapter_class = adapter_class or get_method(section.method)
        return adapter_class, adapter_class.config_class.from_options(section.method, dict(section.config))
    except DifftuneError as err:
        raise AdapterFileError(f"{source}: header field '{where}method'/'{where}config': {err}") from None


def _file_denoiser(pipeline_or_model: Any, component: str) -> nn.Module:
    """The denoiser a file's main section goes to: the pipeline's component of that name (a file of
    Wan 2.2's low-noise expert goes to ``transformer_2``), else `find_denoiser`'s."""
    if not isinstance(pipeline_or_model, nn.Module):
        module = getattr(pipeline_or_model, component, None)
        if isinstance(module, nn.Module) and component in (*denoiser_components(), *expert_components()):
            return module
    return find_denoiser(pipeline_or_model)[0]


def _text_encoder(pipeline: Any, name: str, source: str) -> nn.Module:
    encoder = None if isinstance(pipeline, nn.Module) else getattr(pipeline, name, None)
    if not isinstance(encoder, nn.Module):
        raise DifftuneError(f"{source}: the adapter also adapts the {name}; load it into a pipeline that has "
                            f"one (difftune.load_adapter(pipe, ...)), not into a bare model")
    return encoder


def _attach_from_file(model: nn.Module, adapter_class: type[Adapter], config: AdapterConfig,
                      section: AdapterSection, source: str, name: str = DEFAULT_ADAPTER_NAME) -> Adapter:
    """Attach one component's adapter as its file section holds it (`Adapter.attach_from_file`)."""
    _refuse_taken_name(model, name)
    modules = resolve_targets(model, section.targets)
    adapter_class.check_targets(modules, config)
    adapter = adapter_class(model, config, modules)
    return _install(model, adapter, lambda each: each.attach_from_file(modules, section, source), name)


def _modules_holding(model: Any, name: str | None = None) -> list[nn.Module]:
    """The denoiser and every adapted text encoder (with ``name``: those that hold an adapter of it)."""
    return [module for module in _adapted_modules(model) if name is None or has_adapter(module, name)]


def _selected(module: nn.Module, name: str | None) -> list[Adapter]:
    adapters = adapter_set.adapters_on(module)
    return list(adapters.values()) if name is None else [adapters[name]] if name in adapters else []


@contextlib.contextmanager
def _unmerged(module: nn.Module) -> Any:
    """Run a change of weights or switches on the adapters as they compute unmerged, then merge the
    set again if it was merged."""
    merged = adapter_set.is_merged_set(module)
    if merged:
        adapter_set.unmerge_set(module)
    yield
    if merged and adapter_set.adapters_on(module):
        adapter_set.merge_set(module, keep_original=True)


def set_adapter_scale(model: Any, scale: float, name: str | None = None) -> None:
    """Strength at inference: W0 + scale·ΔW (0 gives the base model); text encoders too. ``name``
    picks one adapter; without it every adapter takes ``scale``."""
    if name is not None:
        get_adapter(model, name)  # a clear error when there is none of that name
    for module in _modules_holding(model, name):
        with _unmerged(module):
            for adapter in _selected(module, name):
                adapter.set_scale(scale)


def _names(names: AdapterNames) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def set_adapters(model: Any, names: AdapterNames, weights: float | Sequence[float] | None = None) -> None:
    """Use exactly the adapters ``names`` with ``weights`` (one each, or one for all; default 1): the
    model computes W0 + Σ wᵢ·ΔWᵢ over them, the others switched off (kept, at no cost). As diffusers'
    ``pipe.set_adapters``; a pipeline's text encoders follow by the same names. Nothing reloads."""
    names = _names(names)
    values = [1.0] * len(names) if weights is None else _names_weights(names, weights)
    modules = _adapted_modules(model)
    known = {name for module in modules for name in adapter_set.adapters_on(module)}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise DifftuneError(f"set_adapters: no adapter named {', '.join(map(repr, unknown))} "
                            f"(attached: {', '.join(sorted(known)) or 'none'})")
    chosen = dict(zip(names, values, strict=True))
    for module in modules:
        with _unmerged(module):
            for name, adapter in adapter_set.adapters_on(module).items():
                adapter._reapply(chosen.get(name, adapter.scale), name in chosen)


def _names_weights(names: list[str], weights: float | Sequence[float]) -> list[float]:
    if isinstance(weights, (int, float)):
        return [float(weights)] * len(names)
    values = [float(w) for w in weights]
    if len(values) != len(names):
        raise DifftuneError(f"set_adapters: {len(names)} names but {len(values)} weights")
    return values


def enable_adapters(model: Any) -> None:
    """Switch every adapter on again, each at its scale."""
    _switch(model, True)


def disable_adapters(model: Any) -> None:
    """Switch every adapter off: the model computes its base output bit for bit (the adapters stay)."""
    _switch(model, False)


def _require_adapters(model: Any) -> None:
    """A clear error when the denoiser holds no adapter."""
    if not list_adapters(model):
        get_adapter(model)


def _switch(model: Any, active: bool) -> None:
    _require_adapters(model)
    for module in _adapted_modules(model):
        with _unmerged(module):
            for adapter in adapter_set.adapters_on(module).values():
                adapter.set_active(active)


def merge_adapter(model: Any, unload: bool = True) -> nn.Module:
    """Fold the active adapters into plain weights, W0 + Σ wᵢ·ΔWᵢ (same outputs, no extra cost).

    With ``unload=True`` (default) the adapters are removed for good (switched-off ones too) and the
    model holds plain modules. With ``unload=False`` they stay attached in merged form and
    `unmerge_adapter` restores the exact original weights (kept in memory meanwhile).
    """
    denoiser, _ = find_denoiser(model)
    _require_adapters(denoiser)
    for module in _adapted_modules(model):
        adapters = list(adapter_set.adapters_on(module).values())
        alone = len(adapters) == 1 and adapters[0].active and not adapter_set.is_merged_set(module)
        if alone:  # one adapter: its own merge, as it always was
            if unload:
                adapters[0].unload()
                _forget(module, adapters[0])
            else:
                adapters[0].merge(keep_original=True)
            continue
        if unload:
            if adapter_set.is_merged_set(module):
                adapter_set.unmerge_set(module)
            adapter_set.merge_set(module, keep_original=False)
            for adapter in reversed(adapters):
                adapter.detach()
                _forget(module, adapter)
        elif not adapter_set.is_merged_set(module):
            adapter_set.merge_set(module, keep_original=True)
    return denoiser


def unmerge_adapter(model: Any) -> None:
    for module in _adapted_modules(model):
        if adapter_set.is_merged_set(module):
            adapter_set.unmerge_set(module)
        for adapter in adapter_set.adapters_on(module).values():
            adapter.unmerge()


def remove_adapter(model: Any) -> nn.Module:
    """Remove every adapter and restore the original modules and weights exactly, and their
    requires_grad flags (a pipeline's adapted text encoders too)."""
    denoiser, _ = find_denoiser(model)
    _require_adapters(denoiser)
    for module in _adapted_modules(model):
        for name in reversed(list(adapter_set.adapters_on(module))):
            _delete(module, name)
    return denoiser


def delete_adapter(model: Any, name: str) -> nn.Module:
    """Remove the adapter ``name`` (from the denoiser and the text encoders that hold one of that name);
    the others keep computing as they did, and without any the base is back bit for bit."""
    denoiser, _ = find_denoiser(model)
    modules = _modules_holding(model, name)
    if not modules:
        get_adapter(denoiser, name)  # a clear error naming the attached ones
    for module in modules:
        _delete(module, name)
    return denoiser


def _delete(module: nn.Module, name: str) -> None:
    with _unmerged(module):
        adapter = adapter_set.adapters_on(module)[name]
        adapter.detach()
        _forget(module, adapter)


def _forget(module: nn.Module, adapter: Adapter) -> None:
    adapter_set.unregister(module, adapter)
