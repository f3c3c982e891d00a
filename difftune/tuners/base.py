"""What every adapter method provides, and the shared machinery for layer-wrapping ones.

`Adapter` is the model-level contract the public API (`difftune.api`) talks to: attach,
trainable parameters, the tensors of a file, scale, merge/unmerge and detach. Methods
that wrap individual layers (SVFit, TLoRA) subclass `LayerAdapter` and only write an
`AdapterLayer`: the replace-in-parent, restore, merge and file plumbing lives here once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapter_file import AdapterSection
from ..errors import AdapterFileError, DifftuneError
from ..options import option
from ..targeting import WRAPPED_LAYER, check_layer_types, plain_layer

DEFAULT_ADAPTER_NAME = "default"  # the name of an adapter attached without one (today's single adapter)


@dataclasses.dataclass
class AdapterConfig:
    """Options shared by every method; subclasses add their own fields."""

    targets: str | list[str] = option(
        "attn", "preset (attn, attn-ff, conv, all), regex on module names, or a list of them")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_options(cls, method: str, options: dict[str, Any]) -> AdapterConfig:
        """Build a config, naming unknown options instead of a bare TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise DifftuneError(
                f"unknown option(s) for method '{method}': {', '.join(unknown)}. "
                f"Valid options: {', '.join(sorted(known))}"
            )
        for name, value in sorted(options.items()):
            if _non_finite(value):  # NaN passes every `value <= 0` check of validate()
                raise DifftuneError(f"{method} option '{name}' must be a finite number, got {value!r}")
        failure = None
        try:
            config = cls(**options)
            config.validate()  # the method's own messages first: they say what a value means
        except DifftuneError:
            raise
        except (TypeError, ValueError, AttributeError) as err:  # a value of the wrong type
            failure = err
        # then the types validate() does not look at (an option read from a damaged file header)
        hints = typing.get_type_hints(cls)
        for name, value in options.items():
            if not _conforms(value, hints[name]):
                raise DifftuneError(f"option '{name}' of method '{method}' must be "
                                    f"{_annotation_text(hints[name])}, got {value!r}")
        if failure is not None:
            raise failure
        return config

    def validate(self) -> None:
        """Check option values; raise DifftuneError naming the option."""


def _non_finite(value: Any) -> bool:
    """Whether an option value is (or, in a list, holds) a NaN or infinite float."""
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def _conforms(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a config field's annotation (int, float, str, bool, None, Literal,
    list[...] and unions of them). An int fits float; a bool fits only bool."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, member) for member in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        (item, *_) = typing.get_args(annotation) or (Any,)
        return isinstance(value, (list, tuple)) and all(_conforms(v, item) for v in value)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if isinstance(value, bool):
        return annotation is bool
    if annotation is float:
        return isinstance(value, (int, float))
    return isinstance(annotation, type) and isinstance(value, annotation)


def _annotation_text(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


# The floating dtypes an adapter file may hold its weights in (a run in fp32, a save from an fp16
# or bf16 model); loading casts them to the model's. Anything else (ints, bools) is a damaged file.
FILE_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_file_tensor(key: str, value: torch.Tensor, target: torch.Tensor | None, source: str,
                      shape: bool = True) -> None:
    """One file tensor against the adapter's own: a float for a float (`FILE_FLOAT_DTYPES`), the exact
    dtype otherwise, and (with ``shape``) the exact shape. Raises AdapterFileError naming it."""
    expected_dtype = target.dtype if target is not None else torch.float32
    if expected_dtype.is_floating_point:
        fits = value.dtype in FILE_FLOAT_DTYPES
        wanted = "a float (" + ", ".join(str(d).removeprefix("torch.") for d in FILE_FLOAT_DTYPES) + ")"
    else:
        fits, wanted = value.dtype == expected_dtype, str(expected_dtype).removeprefix("torch.")
    if not fits:
        found = str(value.dtype).removeprefix("torch.")
        raise AdapterFileError(f"{source}: tensor '{key}' has dtype {found}, expected {wanted}")
    if shape and target is not None and value.shape != target.shape:
        raise AdapterFileError(f"{source}: tensor '{key}' has shape {list(value.shape)}, "
                               f"expected {list(target.shape)}")


def check_tensor_names(expected: dict, given: dict, source: str) -> None:
    """Refuse a file whose tensor names are not exactly the adapter's, naming a few of each side."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{source}: adapter tensors do not fit the model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# Several adapters on one layer nest: each adapter layer (difftune's `AdapterLayer`, peft's tuner
# layers) holds the next one in as ``base_layer``, down to the model's own layer; each adds its own
# update to what the layers inside it compute, so the chain computes W0 + Σ wᵢ·ΔWᵢ. difftune's layers
# go around the whole chain, peft's right around the model's layer (`tuners.peft.stacking`).

def layer_chain(model: nn.Module, name: str) -> list[nn.Module]:
    """The adapter layers at ``name``, outermost first, then the plain layer."""
    chain = [model.get_submodule(name)]
    while isinstance(chain[-1]._modules.get(WRAPPED_LAYER), nn.Module):
        chain.append(chain[-1]._modules[WRAPPED_LAYER])
    return chain


def unwrap_layer(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Take the adapter layer ``layer`` out of the chain at ``name``, wherever it is in it."""
    chain = layer_chain(model, name)
    if chain[0] is layer:
        replace_module(model, name, layer._modules[WRAPPED_LAYER])
        return
    for outer, inner in itertools.pairwise(chain):
        if inner is layer:
            setattr(outer, WRAPPED_LAYER, layer._modules[WRAPPED_LAYER])
            return
    raise DifftuneError(f"the adapter layer to remove is no longer at '{name}'")


def strip_wrapped_names(key: str) -> str:
    """A tensor name as it reads without adapter layers around its layer (``a.base_layer.b`` → ``a.b``)."""
    return key.replace(f".{WRAPPED_LAYER}.", ".")


class Adapter(ABC):
    """One adapter attached to one model (a UNet, a DiT or any nn.Module)."""

    method: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    supported_layers: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv2d)
    supported_description: ClassVar[str] = "Linear and Conv2d layers"
    # True when the adapter file is also a diffusers LoRA file (`pipe.load_lora_weights`),
    # so trainers also write it under diffusers' default name.
    diffusers_lora_file: ClassVar[bool] = False
    # Why the method cannot train on a base whose weights bitsandbytes holds in 8 or 4 bits (None: it
    # can, as a layer wrapper that leaves W0 alone, like peft's LoRA with its bnb layers).
    quantized_base_refusal: ClassVar[str | None] = ("it needs the dense base weight: use --mixed_precision "
                                                    "bf16 instead")
    # Why the method cannot run under FSDP, which shards the base weights (None: it can).
    fsdp_refusal: ClassVar[str | None] = None
    # Options the one-step (HiPA) trainer uses unless the flags say otherwise.
    one_step_defaults: ClassVar[dict[str, Any]] = {}
    # The option that sizes the adapter by a count of trainable parameters, if the method has one:
    # benchmarks give it another method's count, for budgets that compare.
    budget_option: ClassVar[str | None] = None

    # True for a method that writes its update into the base tensors themselves (SaRA): stacked
    # with others, what those tensors hold already includes it.
    writes_base_tensors: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: AdapterConfig, modules: dict[str, nn.Module]):
        self.model = model
        self.config = config
        self.target_names = list(modules)
        self.scale = 1.0
        self.merged = False
        self.name = DEFAULT_ADAPTER_NAME  # its name among the adapters of its model (set before attach)
        self.active = True
        self.frozen = False  # attached as a fixed base for another adapter that trains
        self.source: str | None = None  # the file it was loaded from

    @classmethod
    def check_targets(cls, modules: dict[str, nn.Module], config: AdapterConfig | None = None) -> None:
        """Refuse, naming them, the targeted modules this method cannot adapt (with ``config``, also
        those its options rule out: a peft type that takes no Conv2d)."""
        check_layer_types(cls.method, modules, cls.supported_layers, cls.supported_description)

    @abstractmethod
    def attach(self, modules: dict[str, nn.Module]) -> None:
        """Add the adapter so that the model's output is unchanged."""

    @abstractmethod
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters an optimizer should train, with their names in the model."""

    @abstractmethod
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that make up the adapter file, keyed by names relative to the model."""

    @abstractmethod
    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Inverse of `adapter_state_dict`; names ``source`` when keys are missing."""

    # Whether a file's tensor shapes must equal those of the freshly attached adapter (False for
    # methods whose load resizes layers, e.g. SVFit's rank; their load checks shapes itself).
    file_shapes_fixed: ClassVar[bool] = True

    def check_file_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Refuse a file whose tensors are not exactly this adapter's: every name present and no
        other, each of the right dtype and shape. Runs before anything is copied into the model."""
        expected = self.adapter_state_dict()
        check_tensor_names(expected, tensors, source)
        for key, target in expected.items():
            check_file_tensor(key, tensors[key], target, source, shape=self.file_shapes_fixed)

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], source: str,
                          extra: dict[str, Any] | None = None) -> None:
        """Copy a file's tensors into this attached adapter (a checkpoint on resume, an imported file):
        `check_file_tensors`, then `load_adapter_state_dict`. ``extra`` is the file's method facts
        (`file_metadata`); None for a checkpoint of this very adapter, whose own facts then apply."""
        self.check_file_tensors(tensors, source)
        self.load_adapter_state_dict(tensors, source)

    def attach_from_file(self, modules: dict[str, nn.Module], section: AdapterSection, source: str) -> None:
        """Attach as a file holds the adapter, in one pass (`difftune.load_adapter`).

        This default attaches as the config says, then copies the file's tensors: right where the
        attach depends on the config only (LoRA, TLoRA). A method whose attach computes what the file
        already holds (SaRA's masks, SVFit's ranks) builds straight from the file instead."""
        self.check_file_metadata(section.extra, source)
        self.attach(modules)
        self.load_file_tensors(section.tensors, source, section.extra)

    def file_section(self) -> AdapterSection:
        """This adapter as a file section: what `attach_from_file` rebuilds it from."""
        return AdapterSection(method=self.method, config=self.config.to_dict(), targets=self.target_names,
                              fingerprint=self.base_fingerprint, extra=self.file_metadata(),
                              tensors=self.adapter_state_dict())

    @abstractmethod
    def _apply_scale(self, scale: float) -> None:
        """Make the unmerged forward use W0 + scale·ΔW."""

    @abstractmethod
    def _merge(self, keep_original: bool) -> None:
        """Fold scale·ΔW into the base weights (forward then costs nothing extra)."""

    @abstractmethod
    def _unmerge(self) -> None:
        """Restore the exact base weights kept by `_merge`."""

    @abstractmethod
    def _detach(self) -> None:
        """Remove every trace of the adapter from the (unmerged) model."""

    def changed_tensor_names(self) -> list[str]:
        """The base tensors (``<module>.weight``, ``<module>.bias``) whose values the merged adapter
        changes: what an export compares against the base model to get ΔW."""
        return [f"{name}.weight" for name in self.target_names]

    @classmethod
    def weightless_parameter_count(cls, model: nn.Module, config: AdapterConfig,
                                   modules: dict[str, nn.Module]) -> int | None:
        """The trainable-parameter count on a weightless (meta-device) model, for methods that cannot
        attach to one; None: attach and count (`difftune.params`)."""
        return None

    @classmethod
    def frozen_buffer_bytes(cls, layers: list[nn.Linear], trainable: int) -> int:
        """Bytes the method keeps beside the base weights besides its trainable values, when it trains
        ``trainable`` values on ``layers`` (`difftune.memory`'s estimate; none for most methods)."""
        return 0

    @classmethod
    def exact_lora_refusal(cls, config: Mapping[str, Any]) -> str | None:
        """Why an adapter of this method with ``config`` (its options) has no exact LoRA form for other
        tools' LoRA files; None when `lora_factors` gives one. An export then extracts one by SVD."""
        return f"a {cls.method} adapter is not a LoRA"

    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{module: (down, up, alpha)}`` with ΔW = alpha/rank · up·down exactly (rank = down's first
        size), for methods whose `exact_lora_refusal` is None."""
        raise DifftuneError(self.exact_lora_refusal(self.config.to_dict()) or f"{self.method}: no LoRA form")

    def merged_and_base_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One tensor the adapter changes (a name of `changed_tensor_names`) on its own: its merged value
        at the current scale and its base value, as the merged model and the bare model hold them.
        Computed for this tensor alone and the model left as it was, so an export can stream a whole
        model through memory one tensor at a time. None: this method merges only as a whole (an
        export then merges everything at once); the layer-wrapping methods, LoRA and SaRA do it."""
        return None

    def mark_merged(self, merged: bool) -> None:
        """Say that this adapter's update is in the base tensors (a merge of several adapters wrote
        them: the adapter then adds nothing in the forward and trains nothing), or no longer is."""
        raise DifftuneError(f"method '{self.method}' cannot be merged together with other adapters")

    def file_metadata(self) -> dict[str, Any]:
        """Method-specific facts stored in the file (for example what rebuilds a mask)."""
        return {}

    def check_file_metadata(self, extra: dict[str, Any], source: str) -> None:  # noqa: B027
        """Refuse a file whose method-specific facts are missing or damaged (checks only)."""

    def extra_header(self, component: str) -> dict[str, str]:
        """Additional safetensors header entries (for example diffusers' LoRA metadata)."""
        return {}

    @classmethod
    def combine_files(cls, sections: list[AdapterSection], scales: list[float],
                      sources: list[str]) -> AdapterSection:
        """Fold the denoiser sections of several files of this method into one with
        ΔW = Σ scaleᵢ·ΔWᵢ."""
        raise DifftuneError(f"method '{cls.method}' cannot combine several adapter files into one")

    # --- training hooks: no-ops unless a method needs them ----------------------------
    # The trainer calls them in this order each optimizer step: forward (+ the
    # regularization_loss) → backward → before_optimizer_step → clip → optimizer.step
    # → finish_optimizer_step (by default after_optimizer_step).

    def default_learning_rate(self) -> float | None:
        """A method's own learning-rate rule, used when the user gives none."""
        return None

    def optimizer_parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer (a method may exempt some from decay)."""
        params = [p for _, p in self.named_trainable_parameters()]
        return [{"params": params, "weight_decay": weight_decay}]

    def regularization_loss(self) -> torch.Tensor | None:
        """An extra loss term added to the training loss, if the method has one."""
        return None

    def before_optimizer_step(self, step: int, max_steps: int) -> None:  # noqa: B027
        """Called after the (accumulated) backward and before gradient clipping."""

    def after_optimizer_step(self, step: int, max_steps: int, optimizer: Any) -> None:  # noqa: B027
        """Called after each optimizer step (``step`` counts completed steps)."""

    def finish_optimizer_step(self, step: int, max_steps: int, optimizer: Any, stepped: bool) -> None:
        """What the trainer calls after ``optimizer.step()``; ``stepped`` is False when the optimizer
        skipped its update (accelerate's skip on an fp16 gradient overflow), so a method does not have
        to infer it from the optimizer's state. By default `after_optimizer_step`, skipped or not."""
        self.after_optimizer_step(step, max_steps, optimizer)

    def training_state(self) -> dict[str, Any]:
        """Extra state a checkpoint must keep to resume exactly (tensors or JSON values)."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore `training_state`; called before the optimizer state is loaded."""

    # --- lifecycle helpers the public API uses --------------------------------------

    def set_scale(self, scale: float) -> None:
        self._reapply(scale, self.active)

    def _reapply(self, scale: float, active: bool) -> None:
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        self.scale, self.active = float(scale), bool(active)
        self._apply_scale(self.effective_scale)
        if was_merged:
            self.merge()

    @property
    def effective_scale(self) -> float:
        """The weight the model uses now: the scale while active, 0 while switched off."""
        return self.scale if self.active else 0.0

    def set_active(self, active: bool) -> None:
        """Switch the adapter on (its scale) or off (weight 0: the layers pass through)."""
        self._reapply(self.scale, active)

    def freeze(self) -> None:
        """Keep the adapter's tensors fixed (a base another adapter trains on top of)."""
        self.frozen = True
        for _, param in self.named_trainable_parameters():
            param.requires_grad_(False)

    def merge(self, keep_original: bool = True) -> None:
        if not self.merged:
            self._merge(keep_original)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._unmerge()
            self.merged = False

    def detach(self) -> None:
        """Restore the original modules and weights exactly."""
        self.unmerge()
        self._detach()

    def unload(self) -> None:
        """Fold the adapter into the weights for good and remove it (no extra memory)."""
        if not self.merged:
            self._merge(keep_original=False)
        self._detach()
        self.merged = False


class AdapterLayer(nn.Module, metaclass=ABCMeta):
    """Wraps one base layer. Subclasses define the adapted forward and the dense ΔW.

    Contract: at scale α the layer computes (W0 + α·ΔW)·x + b, where ΔW is what
    `delta_weight` returns; α = 0 gives the base layer exactly. ``base_layer`` may be another
    adapter's layer (stacked adapters): the layer then computes base_layer(x) + α·ΔW·x, ΔW taken
    from the model's own layer (`plain`) as it is without any adapter (`base_weight`).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.scale = 1.0
        self.merged = False
        self._original_weight: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        # diffusers reads attributes such as .weight or .in_features off projections.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            # the model's own layer's (not another adapter layer's in between: its tensors are its own)
            return getattr(plain_layer(self._modules["base_layer"]), name)

    @property
    def plain(self) -> nn.Module:
        """The model's own layer under this and any other adapter layer."""
        return plain_layer(self.base_layer)

    @property
    def stacked(self) -> bool:
        """Whether the wrapped layer computes more than W0·x + b (another adapter's layer or entries)."""
        from ..sparse_backprop import entry_sets

        plain = self.plain
        return plain is not self.base_layer or bool(entry_sets(plain, "weight"))

    def base_weight(self) -> torch.Tensor:
        """W0: the plain layer's weight without any adapter's change (SaRA's entries written back)."""
        from ..sparse_backprop import base_tensor

        return base_tensor(self.plain, "weight")

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """ΔW at scale 1, in the base weight's shape, in float32."""

    @abstractmethod
    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output at ``self.scale`` without building W densely when cheaper."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged or self.scale == 0.0:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + scale·ΔW in the base weight's dtype: what `merge` writes."""
        weight = self.base_layer.weight
        return (weight.float() + self.scale * self.delta_weight().reshape(weight.shape)).to(weight.dtype)

    @torch.no_grad()
    def merge(self, keep_original: bool) -> None:
        weight = self.base_layer.weight
        merged = self.merged_weight()
        if keep_original:
            self._original_weight = weight.data
        weight.data = merged
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._original_weight is None:
            raise DifftuneError("adapter was merged without keeping the original weights")
        self.base_layer.weight.data = self._original_weight
        self._original_weight = None
        self.merged = False


class LayerAdapter(Adapter):
    """An adapter made of one `AdapterLayer` per targeted module."""

    @abstractmethod
    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        """Wrap one targeted module (its output must be unchanged at init)."""

    def attach(self, modules: dict[str, nn.Module]) -> None:
        self.layers: dict[str, AdapterLayer] = {}
        for name in modules:
            layer = self.make_layer(name, self.model.get_submodule(name))  # around other adapters' layers
            replace_module(self.model, name, layer)
            self.layers[name] = layer

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, layer in self.layers.items():
            for pname, param in layer.named_parameters():
                if not pname.startswith("base_layer.") and param.requires_grad:
                    yield f"{name}.{pname}", param

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{name}.{key}": tensor
            for name, layer in self.layers.items()
            for key, tensor in layer.state_dict().items()
            if not key.startswith("base_layer.")
        }

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        expected = self.adapter_state_dict()
        check_tensor_names(expected, tensors, source)
        for key, target in expected.items():
            value = tensors[key]
            if value.shape != target.shape:
                raise AdapterFileError(f"{source}: tensor '{key}' has shape {list(value.shape)}, "
                                       f"expected {list(target.shape)}")
            target.copy_(value)

    def merged_and_base_tensor(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        layer = self.layers.get(name.removesuffix(".weight"))
        if layer is None or self.merged or not name.endswith(".weight"):
            return None
        return layer.merged_weight(), layer.base_layer.weight.detach()

    def _apply_scale(self, scale: float) -> None:
        for layer in self.layers.values():
            layer.scale = scale

    def mark_merged(self, merged: bool) -> None:
        for layer in self.layers.values():
            layer.merged = merged

    def _merge(self, keep_original: bool) -> None:
        for layer in self.layers.values():
            layer.merge(keep_original)

    def _unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def _detach(self) -> None:
        for name, layer in self.layers.items():
            unwrap_layer(self.model, name, layer)
        self.layers = {}
