"""ΔW of an attached adapter, and its best rank-r approximation (truncated SVD).

Every method merges into plain weights, so ΔW = W_merged − W0 is read the same way for all of
them (LoRA, SaRA, SVFit, TLoRA, and any registered later): merge, copy the tensors the adapter
changes, remove the adapter (which restores W0 exactly), copy them again. A conv kernel
(out, in, kh, kw) is factored as the matrix out × (in·kh·kw), as kohya's LoCon does: the down
factor keeps the kernel shape, the up factor is a 1×1 conv.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import (
    adapted_experts,
    adapted_text_encoders,
    adapter_view,
    find_denoiser,
    merge_adapter,
    remove_adapter,
)
from ..errors import DifftuneError
from ..tuners.svfit.functional import rank_for_energy, singular_triplets


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute).detach()


def merged_and_base(pipeline: Any) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``{component: {"<module>.weight" | "<module>.bias": (merged, base)}}`` for every tensor the
    attached adapter(s) change, at their current scale. The adapters are removed afterwards: the
    pipeline holds the base model again, bit for bit."""
    denoiser, component = find_denoiser(pipeline)
    models = {component: denoiser, **adapted_text_encoders(pipeline), **adapted_experts(pipeline)}
    names = {part: adapter_view(model).changed_tensor_names() for part, model in models.items()}
    merge_adapter(pipeline, unload=False)
    merged = {part: {n: _tensor(models[part], n).clone() for n in names[part]} for part in models}
    remove_adapter(pipeline)
    return {
        part: {n: (merged[part][n], _tensor(models[part], n).clone()) for n in names[part]} for part in models
    }


TensorPair = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def changed_tensors(pipeline: Any) -> dict[str, dict[str, TensorPair]]:
    """``{component: {tensor name: pair}}`` for every tensor the attached adapters change, where
    ``pair()`` gives (merged, base) at the current scale when called: computed for that tensor alone
    (`Adapter.merged_and_base_tensor`), so a writer that calls them one at a time holds one tensor
    beside the model. The adapters stay attached for the pairs to use. A method that merges only as
    a whole is merged here at once instead (`merged_and_base`, which removes the adapters)."""
    denoiser, component = find_denoiser(pipeline)
    models = {component: denoiser, **adapted_text_encoders(pipeline)}
    adapters = {part: adapter_view(model) for part, model in models.items()}
    names = {part: adapter.changed_tensor_names() for part, adapter in adapters.items()}
    if all(not names[part] or adapter.merged_and_base_tensor(names[part][0]) is not None
           for part, adapter in adapters.items()):
        return {part: {name: functools.partial(adapters[part].merged_and_base_tensor, name)
                       for name in names[part]} for part in adapters}
    bulk = merged_and_base(pipeline)
    return {part: {name: functools.partial(lambda pair: pair, pair) for name, pair in tensors.items()}
            for part, tensors in bulk.items()}


def adapter_deltas(pipeline: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: {tensor name: ΔW in float32}}``; see `merged_and_base`."""
    return {
        part: {n: merged.float() - base.float() for n, (merged, base) in tensors.items()}
        for part, tensors in merged_and_base(pipeline).items()
    }


@contextlib.contextmanager
def weights_replaced(pipeline: Any, values: dict[str, dict[str, torch.Tensor]]) -> Iterator[None]:
    """Inside the block the named tensors of the pipeline's components hold ``values``; the
    originals are copied back after it (a merged export without touching the caller's model)."""
    originals = []
    try:
        with torch.no_grad():
            for component, tensors in values.items():
                model = getattr(pipeline, component)
                for name, value in tensors.items():
                    target = _tensor(model, name)
                    originals.append((target, target.clone()))
                    target.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for target, original in originals:
                target.copy_(original)


@dataclasses.dataclass
class Factors:
    """A rank-r approximation up·down of one ΔW, with what it leaves out."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    rank: int
    norm: float  # ‖ΔW‖_F
    residual: float  # ‖ΔW − up·down‖_F

    @property
    def relative_error(self) -> float:
        return self.residual / self.norm if self.norm > 0 else 0.0


def low_rank_factors(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Factors:
    """Truncated SVD of ΔW at ``rank`` (capped at the matrix's) or at the smallest rank whose
    singular values hold ``energy`` of ‖ΔW‖². The error is computed from the dropped singular values."""
    if (rank is None) == (energy is None):
        raise DifftuneError("give exactly one of rank and energy")
    if delta.dim() not in (2, 4):
        raise DifftuneError(
            f"only Linear and Conv2d weights factor into a LoRA, got shape {list(delta.shape)}"
        )
    matrix = delta.reshape(delta.shape[0], -1).float()
    u, sigma, vh = singular_triplets(matrix)
    total = float(sigma.double().square().sum())
    keep = min(rank, len(sigma)) if rank is not None else rank_for_energy(sigma, float(energy))
    residual = math.sqrt(max(0.0, float(sigma[keep:].double().square().sum())))
    root = sigma[:keep].sqrt()
    down = root[:, None] * vh[:keep]
    up = u[:, :keep] * root[None, :]
    if delta.dim() == 4:
        down = down.reshape(keep, *delta.shape[1:])
        up = up.reshape(delta.shape[0], keep, 1, 1)
    return Factors(down.contiguous(), up.contiguous(), keep, math.sqrt(total), residual)


def factor_deltas(
    deltas: dict[str, torch.Tensor], rank: int | None, energy: float | None, description: str = "SVD"
) -> tuple[dict[str, Factors], dict[str, float]]:
    """Factor every weight ΔW (2-D or 4-D); the others (biases, norms) cannot be a LoRA and are
    returned as ``{name: ‖Δ‖_F}``, so a report counts them into the error."""
    factors, dropped = {}, {}
    for name, delta in tqdm(deltas.items(), desc=description, leave=False):
        if name.endswith(".weight") and delta.dim() in (2, 4):
            factors[name.removesuffix(".weight")] = low_rank_factors(delta, rank, energy)
        else:
            dropped[name] = float(delta.double().norm())
    return factors, dropped


def dense(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up·down in the weight's shape (the LoRA product; conv kernels too)."""
    product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return product.reshape(up.shape[0], *down.shape[1:])
