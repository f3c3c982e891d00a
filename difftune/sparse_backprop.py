"""Unstructured backprop: train chosen entries of a model's parameters, and nothing else.

SaRA's memory-saving mechanism, kept independent of SaRA so that any masked or
selective fine-tuning (diff pruning, LT-SFT, ...) can use it: "train these entries of
these parameters". For each chosen tensor W it keeps, per trained entry:

- ``index``: the flat position (int32; int64 only for tensors of 2**31 entries or more),
- ``base``: W0 at that position, in W's dtype (restores W exactly, gives ΔW and α),
- ``delta``: an fp32 ``nn.Parameter`` of shape (nnz,), registered on the owning module
  as ``sparse_delta_<name>`` so that ``model.parameters()``, optimizers,
  ``clip_grad_norm_``, DDP and state dicts all see it (the base W stays frozen).

W itself holds ``W0 + scale·delta`` at the chosen entries: the values are written into
the weight in place (no dense copy) whenever ``delta``, the scale or W changed, so the
layer's own forward reads a plain dense weight. While grad is enabled, reading
``module.<name>`` goes through a small autograd Function whose output aliases W and
whose backward turns the layer's dense weight gradient into delta's 1-D gradient
``grad.flatten()[index]``. That dense gradient is a temporary of one layer's backward,
freed as soon as it is gathered: no dense gradient is kept, the optimizer state is
nnz-sized, and under DDP only the 1-D gradients are all-reduced.

For a Linear or (ungrouped, zero-padded) Conv2d weight the routed class also replaces
the layer's forward by `sampled_gradients.SampledLayer`, whose backward computes the
input gradient as usual and only the trained entries of the weight gradient
(`sampled_gradients`: a sampled product when that is faster for the layer, the dense
product and a gather otherwise; ``weight_gradients="dense"`` keeps the plain path above).
Under torch.compile such a layer runs eagerly (`torch.compiler.disable`: one graph break per
adapted layer, the rest of the model compiled), so the measured choice and the sampled
kernel stay as they are.

Entries can be frozen later (SaRA's progressive adjustment): their gradient is then
returned as 0, the parameter keeps its shape (so optimizers and DDP buckets stay valid).

Several entry sets can train or hold entries of one tensor (stacked SaRA adapters): each keeps W0
(the tensor without any set's change) as its ``base``, and the tensor then holds
W0 + Σ scaleᵢ·deltaᵢ, summed where the sets overlap; `base_tensor` gives W0 back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .errors import DifftuneError
from .sampled_gradients import GradientPaths, SampledLayer, layer_op, modelled_seconds
from .targeting import layers_by_name, plain_layer

_STATE = "_difftune_sparse_entries"
DELTA_PREFIX = "sparse_delta_"
_INDEX_PREFIX = "sparse_index_"
_BASE_PREFIX = "sparse_base_"
_FROZEN_PREFIX = "sparse_frozen_"
_EAGER_WRITE = ("difftune writes the trained entries into the weights outside the compiled graph "
                "(one graph break per adapted weight): compile with fullgraph=False, or merge first")
_EAGER_LAYER = ("difftune trains entries of this layer's weight eagerly, outside the compiled graph (one "
                "graph break per adapted Linear/Conv2d): compile with fullgraph=False, or merge first")
_ROUTED_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def compact_index(flat_index: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat positions in the smallest integer type that holds them (int32 when possible)."""
    dtype = torch.int32 if numel < 2**31 else torch.int64
    return flat_index.to(dtype)


class _RouteGradient(torch.autograd.Function):
    """Identity on the (already written) weight; backward gathers the trained entries."""

    @staticmethod
    def forward(ctx: Any, delta: torch.Tensor, weight: torch.Tensor, entries: SparseEntries):
        ctx.entries = entries
        return weight.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        return ctx.entries.gather_gradient(grad), None, None


class _RouteGradients(torch.autograd.Function):
    """`_RouteGradient` for several entry sets of one weight: each delta gets its entries' gradient."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, sets: tuple[SparseEntries, ...], *deltas: torch.Tensor):
        ctx.sets = sets
        return weight.view_as(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        return None, None, *(entries.gather_gradient(grad) for entries in ctx.sets)


def entry_sets(module: nn.Module, name: str) -> list[SparseEntries]:
    """The entry sets attached to ``module.<name>`` (empty when none)."""
    return module.__dict__.get(_STATE, {}).get(name, [])


def base_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>`` without any entry set's change (W0): the parameter itself when it has none,
    else a copy with W0 written back at every set's entries."""
    param = module._parameters[name]
    sets = entry_sets(module, name)
    if not sets:
        return param
    with torch.no_grad():
        base = param.detach().clone()
        for entries in sets:
            entries.write(base, entries.base.to(base.dtype))
    return base


@torch.no_grad()
def _sync_sets(sets: list[SparseEntries], param: torch.Tensor, force: bool = False) -> None:
    """Write W0 + Σ scaleᵢ·deltaᵢ at the entries of several sets of one tensor, if anything changed."""
    if not force and all(entries._sync_key(param) == entries._synced for entries in sets):
        return
    for entries in sets:
        entries.write(param, entries.base.to(param.dtype))
    for entries in sets:
        entries.add(param, (entries.delta.detach().float() * entries.scale).to(param.dtype))
    for entries in sets:
        entries._synced = entries._sync_key(param)


def _routed_class(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose ``names`` attributes route gradients to the deltas."""
    key = (cls, names)
    if key not in _ROUTED_CLASSES:
        namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                     "_difftune_original_class": cls}
        for name in names:
            namespace[name] = property(_routed_getter(name))
        if "weight" in names and cls.forward in (nn.Linear.forward, nn.Conv2d.forward):
            namespace["forward"] = _sampled_forward
        _ROUTED_CLASSES[key] = type(cls.__name__, (cls,), namespace)
    return _ROUTED_CLASSES[key]


def _original_class(module: nn.Module) -> type:
    return getattr(type(module), "_difftune_original_class", type(module))


def _routed_getter(name: str):
    def getter(module: nn.Module) -> torch.Tensor:
        # a module of the routed class made anew (peft builds its LoRA factors as ``type(layer)(...)``)
        # has no entries, and may not have its parameter yet
        param = module._parameters.get(name)
        if param is None:
            raise AttributeError(name)
        sets = module.__dict__.get(_STATE, {}).get(name)
        if not sets:
            return param
        if len(sets) == 1:
            return sets[0].weight_for_forward(param)
        sets[0].sync(param)
        routed = tuple(entries for entries in sets if entries.routes_gradient())
        if not routed:
            return param
        return _RouteGradients.apply(param, routed, *(entries.delta for entries in routed))

    getter.__name__ = name
    return getter


@torch.compiler.disable(reason=_EAGER_LAYER)
def _sampled_forward(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """The layer's forward, through `SampledLayer` when its weight's entries are being trained."""
    sets = module.__dict__.get(_STATE, {}).get("weight")
    entries = sets[0] if sets and len(sets) == 1 else None
    op = None if entries is None else entries.sampled_op(input)
    if op is None:
        return _original_class(module).forward(module, input)
    weight = module._parameters["weight"]
    entries.sync(weight)
    return SampledLayer.apply(input, weight, module.bias, entries.delta, op, entries)


class SparseEntries:
    """The trained entries of one parameter tensor (``module.<name>``)."""

    def __init__(self, module: nn.Module, name: str, index: torch.Tensor, delta_dtype: torch.dtype,
                 paths: GradientPaths | None = None):
        param = module._parameters[name]
        if param is None:
            raise DifftuneError(f"module {type(module).__name__} has no parameter '{name}'")
        self.module = module
        self.name = name
        stacked = entry_sets(module, name)
        # the first set of a tensor keeps the plain attribute names; others get a number
        self.slot = next(f"{name}{suffix}" for suffix in ("", *(f"_{i}" for i in range(1, 1 << 16)))
                         if DELTA_PREFIX + f"{name}{suffix}" not in module._parameters)
        self.shape = tuple(param.shape)
        self.scale = 1.0
        self.routing = True
        self._synced: tuple | None = None
        self.paths = GradientPaths("dense") if paths is None else paths
        self.last_route: tuple[tuple, str] | None = None  # (choice key, path) of the last backward
        index = compact_index(index.reshape(-1), param.numel()).to(param.device)
        # the sampled route needs row-major order (CSR); selections are sorted, files too
        self._op = layer_op(module) if name == "weight" and bool((index[1:] > index[:-1]).all()) else None
        # logical order, any layout; W0 without the other sets' changes
        base = base_tensor(module, name).detach().reshape(-1).index_select(0, index)
        module.register_buffer(_INDEX_PREFIX + self.slot, index, persistent=False)
        module.register_buffer(_BASE_PREFIX + self.slot, base, persistent=False)
        delta = nn.Parameter(torch.zeros(index.numel(), dtype=delta_dtype, device=param.device))
        module.register_parameter(DELTA_PREFIX + self.slot, delta)
        # alone, the weight already equals base + 0; stacked, the next sync writes all sets at once
        self._synced = None if stacked else self._sync_key(param)
        # state dicts read the Parameter directly: write pending values first
        self._hook = module.register_state_dict_pre_hook(lambda *_: self.sync())

    # tensors live on the module so that .to()/.cuda() move them with the model
    @property
    def index(self) -> torch.Tensor:
        return self.module._buffers[_INDEX_PREFIX + self.slot]

    @property
    def base(self) -> torch.Tensor:
        return self.module._buffers[_BASE_PREFIX + self.slot]

    @property
    def delta(self) -> nn.Parameter:
        return self.module._parameters[DELTA_PREFIX + self.slot]

    @property
    def frozen(self) -> torch.Tensor | None:
        return self.module._buffers.get(_FROZEN_PREFIX + self.slot)

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.name]

    @property
    def numel(self) -> int:
        return self.index.numel()

    @staticmethod
    def _flat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().view(-1)

    def _sync_key(self, param: torch.Tensor) -> tuple:
        delta = self.delta
        return (delta._version, delta.data_ptr(), self.scale, param._version, param.data_ptr())

    def values(self, scale: float | None = None) -> torch.Tensor:
        """``base + scale·delta`` at the trained entries, in float32 (scale defaults to ours)."""
        scale = self.scale if scale is None else scale
        return torch.add(self.base.float(), self.delta.detach().float(), alpha=scale)

    @torch.compiler.disable(reason=_EAGER_WRITE)
    @torch.no_grad()
    def sync(self, param: torch.Tensor | None = None) -> None:
        """Write ``base + scale·delta`` into the weight if anything changed since last time."""
        param = self.weight if param is None else param
        sets = entry_sets(self.module, self.name)
        if len(sets) > 1:
            _sync_sets(sets, param)
            return
        if self._sync_key(param) == self._synced:
            return
        self.write(param, self.values().to(param.dtype))
        self._synced = self._sync_key(param)

    @torch.no_grad()
    def write(self, param: torch.Tensor, values: torch.Tensor) -> None:
        if param.is_contiguous():  # scatter_ with int64 positions is the fastest write on CPU
            self._flat(param).scatter_(0, self.index.long(), values)
        else:  # e.g. channels_last conv kernels: index the logical layout
            param.detach().index_put_(torch.unravel_index(self.index.long(), self.shape), values)

    @torch.no_grad()
    def add(self, param: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``values`` at the entries (stacked sets sum where they overlap)."""
        if param.is_contiguous():
            self._flat(param).index_add_(0, self.index.long(), values)
        else:
            param.detach().index_put_(torch.unravel_index(self.index.long(), self.shape), values,
                                      accumulate=True)

    def routes_gradient(self) -> bool:
        return self.routing and torch.is_grad_enabled() and self.delta.requires_grad

    def weight_for_forward(self, param: torch.Tensor) -> torch.Tensor:
        self.sync(param)
        if self.routes_gradient():
            return _RouteGradient.apply(self.delta, param, self)
        return param

    def sampled_op(self, input: torch.Tensor):
        """The layer op to run through `SampledLayer` now, or None for the plain forward."""
        op = self._op
        if (op is None or self.paths.mode == "dense" or not self.routing or not torch.is_grad_enabled()
                or not self.delta.requires_grad or self.weight.requires_grad
                or (op.kind == "conv2d" and input.dim() != 4)):
            return None
        return op

    def sampled_gradient(self, op, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The 1-D gradient of delta from the layer's input and output gradient (`SampledLayer`)."""
        index = self.index
        key = GradientPaths.key(op, weight, op.rows(x), index.numel(), grad.dtype)
        picked, path = self.paths.entries(key, lambda: op.dense_entries(grad, x, weight, index),
                                          lambda: op.sampled_entries(grad, x, weight, index),
                                          lambda: modelled_seconds(op, weight, key[2], index.numel()))
        self.last_route = (key, path)
        return self._finish_gradient(picked)

    def gather_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The 1-D gradient of delta from the layer's dense weight gradient (then dropped)."""
        if grad.is_contiguous():
            picked = grad.view(-1).index_select(0, self.index)
        else:
            picked = grad[torch.unravel_index(self.index.long(), self.shape)]
        return self._finish_gradient(picked)

    def _finish_gradient(self, picked: torch.Tensor) -> torch.Tensor:
        picked = picked.to(self.delta.dtype)
        if self.scale != 1.0:
            picked.mul_(self.scale)
        frozen = self.frozen
        if frozen is not None:
            picked.masked_fill_(frozen, 0.0)
        return picked

    def set_frozen(self, frozen: torch.Tensor | None) -> None:
        """Freeze entries (bool over the nnz entries): their gradient becomes 0."""
        name = _FROZEN_PREFIX + self.slot
        if frozen is None:
            self.module._buffers.pop(name, None)
            return
        if frozen.shape != (self.numel,) or frozen.dtype != torch.bool:
            raise DifftuneError(f"frozen mask for '{self.name}' must be bool of shape ({self.numel},)")
        self.module.register_buffer(name, frozen.to(self.delta.device), persistent=False)

    def remove(self, restore_base: bool) -> None:
        """Drop the deltas; restore W0 exactly, or keep W0 + scale·delta in the weight."""
        self._hook.remove()
        param = self.weight
        others = [entries for entries in entry_sets(self.module, self.name) if entries is not self]
        if restore_base:
            self.write(param, self.base.to(param.dtype))
        else:
            self.sync(param)
        for prefix in (_INDEX_PREFIX, _BASE_PREFIX, _FROZEN_PREFIX):
            self.module._buffers.pop(prefix + self.slot, None)
        del self.module._parameters[DELTA_PREFIX + self.slot]
        if restore_base and others:  # the other sets' values where they overlap this one's
            _sync_sets(others, param, force=True)


class SparseBackprop:
    """Trains chosen entries of chosen parameter tensors of a model (see module docstring).

    ``selection`` maps ``"<module name>.<parameter name>"`` to the flat indices of the
    entries to train (sorted, unique; any integer dtype). Tensors with no entry are
    skipped. The model's output is unchanged at attach (all deltas start at 0).
    ``weight_gradients`` picks how Linear/Conv2d weights get their entries' gradient
    (`sampled_gradients.PATHS`: by a cost model, measured per layer shape, always sampled, or dense).
    """

    def __init__(self, model: nn.Module, selection: dict[str, torch.Tensor],
                 delta_dtype: torch.dtype = torch.float32, weight_gradients: str = "auto"):
        self.model = model
        self.paths = GradientPaths(weight_gradients)
        self.entries: dict[str, SparseEntries] = {}
        self._module_names: dict[str, str] = {}
        modules = dict(model.named_modules())
        try:
            for key, index in selection.items():
                module_name, _, pname = key.rpartition(".")
                module = modules.get(module_name)
                if module is not None:  # the layer itself under any adapter layers wrapped around it
                    module = plain_layer(module)
                if module is None or pname not in module._parameters:
                    raise DifftuneError(f"no parameter '{key}' in {type(model).__name__}")
                if index.numel() == 0:
                    continue
                entries = SparseEntries(module, pname, index, delta_dtype, self.paths)
                self.entries[key] = entries
                self._module_names[key] = _parameter_owner(model, module, module_name)
                state = module.__dict__.setdefault(_STATE, {})
                state.setdefault(pname, []).append(entries)
                module.__class__ = _routed_class(_original_class(module), tuple(sorted(state)))
        except BaseException:
            self.detach(restore_base=True)
            raise

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name in model.named_parameters(), delta)`` for every trained tensor."""
        for key, entries in self.entries.items():
            yield f"{self._module_names[key]}.{DELTA_PREFIX}{entries.slot}", entries.delta

    @property
    def num_selected(self) -> int:
        return sum(e.numel for e in self.entries.values())

    def index_bytes(self) -> int:
        return sum(e.index.numel() * e.index.element_size() for e in self.entries.values())

    def sync(self) -> None:
        """Write every pending change into the weights (reads of ``module.weight`` do it too)."""
        for entries in self.entries.values():
            entries.sync()

    def set_scale(self, scale: float) -> None:
        for entries in self.entries.values():
            entries.scale = float(scale)
        self.sync()

    def set_weight_gradients(self, mode: str) -> None:
        """Switch the weight-gradient route (`sampled_gradients.PATHS`); measured choices are kept."""
        self.paths.mode = GradientPaths(mode).mode

    def weight_gradient_routes(self) -> list[dict[str, Any]]:
        """Per trained Linear/Conv2d weight: its density and the route its last backward took, with
        the two times behind the choice (modelled for ``auto``, measured for ``measure``)."""
        rows = []
        for key, entries in self.entries.items():
            if entries.last_route is None:
                continue
            choice_key, path = entries.last_route
            choice = self.paths.choices.get(choice_key)
            rows.append({"tensor": key, "shape": entries.shape, "rows": choice_key[2], "nnz": entries.numel,
                         "density": entries.numel / max(1, torch.Size(entries.shape).numel()), "path": path,
                         "dense_s": choice.dense_s if choice else None,
                         "sampled_s": choice.sampled_s if choice else None})
        return rows

    def mark_written(self) -> None:
        """Take the weights as holding the current values (after someone wrote them as a whole: a merge
        of several adapters, which includes these entries), so that the next read does not rewrite them."""
        for entries in self.entries.values():
            entries._synced = entries._sync_key(entries.weight)

    def set_routing(self, enabled: bool) -> None:
        """With routing off the weights are used as plain tensors (no gradient to deltas)."""
        self.sync()
        for entries in self.entries.values():
            entries.routing = enabled

    def detach(self, restore_base: bool = True) -> None:
        """Remove every delta; restore the base weights exactly, or keep the trained ones."""
        for key, entries in list(self.entries.items()):
            module = entries.module
            entries.remove(restore_base)
            state = module.__dict__[_STATE]
            sets = [each for each in state.get(entries.name, []) if each is not entries]
            if sets:
                state[entries.name] = sets
            else:
                state.pop(entries.name, None)
            if state:
                module.__class__ = _routed_class(_original_class(module), tuple(sorted(state)))
            else:
                module.__class__ = _original_class(module)
                del module.__dict__[_STATE]
            del self.entries[key]


def _parameter_owner(model: nn.Module, module: nn.Module, name: str) -> str:
    """The name ``model.named_parameters()`` gives ``module`` (``name`` under adapter layers wrapped
    around it: ``<name>.base_layer...``)."""
    top = model.get_submodule(name)
    return next(each for each, candidate in top.named_modules(prefix=name) if candidate is module)


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters as W0 (`base_tensor`), by the names they have without adapters
    (no ``base_layer`` of adapter layers wrapped around a layer, no adapter tensors)."""
    return {f"{name}.{pname}": base_tensor(layer, pname)
            for name, layer in layers_by_name(model).items()
            for pname, param in layer._parameters.items()
            if param is not None and not pname.startswith(DELTA_PREFIX)}
