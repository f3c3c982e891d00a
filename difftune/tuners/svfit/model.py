"""The SVFit adapter: one `SVFitLayer` per targeted Linear/Conv2d.

Files hold, per layer, the trained s and the base's σ_1..σ_r (2r floats). On load the SVD
is recomputed from the base weights; a base whose σ differ beyond rounding is refused
naming the module, and a 2×2 sketch of each ΔW (in the file's metadata) detects a basis
that rotated between the training-time and the load-time SVD (near-equal singular values
on another device or library), which is reported as a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...adapter_file import AdapterSection
from ...errors import AdapterFileError, BaseModelMismatchError
from ..base import AdapterLayer, check_file_tensor, check_tensor_names, replace_module
from ..layer_ops import WrappingLayerAdapter, matrix_shape
from . import functional as svf
from .config import SVFitConfig
from .layer import SVFitLayer

# |σ_file − σ_now| allowed, in units of σ_max·eps: the rounding of a weight stored in
# another precision (fp16 pipeline, fp32 training) plus SVD rounding.
SIGMA_WEIGHT_EPS_FACTOR = 4.0
SIGMA_SVD_EPS_FACTOR = 64.0
# A ΔW sketch may move by this fraction of its rounding scale before the basis counts as rotated.
PROBE_RELATIVE_TOLERANCE = 1e-3
PROBE_WEIGHT_EPS_FACTOR = 8.0
FILE_TENSORS = ("svfit_s", "svfit_sigma")  # per layer: the trained s and the base's σ_1..σ_r


class SVFitAdapter(WrappingLayerAdapter):
    method = "svfit"
    config_class = SVFitConfig

    config: SVFitConfig
    layers: dict[str, SVFitLayer]
    file_shapes_fixed = False  # the file's rank wins: its load resizes the layers, then checks shapes
    quantized_base_refusal = ("svfit needs the dense base weight (SVFit splits it by its SVD): use "
                              "--mixed_precision bf16 instead")

    @classmethod
    def frozen_buffer_bytes(cls, layers: list[nn.Linear], trainable: int) -> int:
        """U_r and V_r in bf16, r·(out + in) per layer, at full rank (an upper bound for the energy rule)."""
        return sum(2 * min(m.weight.shape) * sum(m.weight.shape) for m in layers)

    def attach(self, modules: dict[str, nn.Module]) -> None:
        self._wrap(modules, {})

    def _wrap(self, modules: dict[str, nn.Module], ranks: dict[str, int]) -> None:
        """One SVD per layer, at ``ranks[name]`` where given, else by the config's rule."""
        self.layers = {}
        for name in tqdm(modules, desc="svfit: SVD of the targeted weights",
                         disable=len(modules) < 32 or None, leave=False):
            # around what is at ``name`` now: the layer, or other adapters' layers around it
            layer = SVFitLayer(self.model.get_submodule(name), self.config, name, ranks.get(name))
            replace_module(self.model, name, layer)
            self.layers[name] = layer

    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        return SVFitLayer(module, self.config, name)

    # --- files -----------------------------------------------------------------------

    def file_metadata(self) -> dict[str, Any]:
        dtypes = {str(layer.base_layer.weight.dtype).removeprefix("torch.") for layer in self.layers.values()}
        return {
            "svd_dtype": self.config.svd_dtype,
            "weight_dtypes": sorted(dtypes),
            "ranks": {name: layer.rank for name, layer in self.layers.items()},
            "probes": {name: svf.probe(layer.svfit_U, layer.delta_s(), layer.svfit_Vh)[0].flatten().tolist()
                       for name, layer in self.layers.items()},
        }

    def attach_from_file(self, modules: dict[str, nn.Module], section: AdapterSection, source: str) -> None:
        """Wrap each layer at the rank the file was trained with (the length of its σ), so a load runs
        one SVD per layer whatever rank rule the config names; then load and check the tensors."""
        check_tensor_names({f"{name}.{key}": None for name in modules for key in FILE_TENSORS},
                           section.tensors, source)
        for key, value in sorted(section.tensors.items()):
            check_file_tensor(key, value, None, source, shape=False)
        self._wrap(modules, _file_ranks(section.tensors, modules, source))
        self.load_file_tensors(section.tensors, source, section.extra)

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor], source: str,
                          extra: dict[str, Any] | None = None) -> None:
        """The file's s and σ into the layers: a base whose σ differ beyond rounding is refused, a
        rotated basis warned about (its ΔW sketches, in ``extra``; None for a checkpoint of this
        adapter, which has none to compare)."""
        extra = extra or {}
        self.check_file_tensors(tensors, source)
        for name, rank in _file_ranks(tensors, self.layers, source).items():
            if rank != self.layers[name].rank:
                self.layers[name].set_rank(rank)  # the rank chosen at training time wins
        eps_weights = max([_eps(name) for name in extra.get("weight_dtypes", [])]
                          + [_eps(layer.base_layer.weight.dtype) for layer in self.layers.values()])
        eps_svd = max(_eps(extra.get("svd_dtype", "float32")), _eps(self.config.svd_dtype))
        for name, layer in self.layers.items():
            sigma = tensors[f"{name}.svfit_sigma"]
            found = layer.svfit_sigma.double().cpu()
            gap = (sigma.double() - found).abs().max().item()
            allowed = (SIGMA_WEIGHT_EPS_FACTOR * eps_weights + SIGMA_SVD_EPS_FACTOR * eps_svd) * max(
                float(found[0]) if len(found) else 0.0, 1e-12)
            if gap > allowed:
                raise BaseModelMismatchError(
                    f"{source}: the singular values of module '{name}' differ from the ones the "
                    f"adapter was trained on (max difference {gap:.3g}, allowed {allowed:.3g}): "
                    "this is not the same base model")
        self.load_adapter_state_dict(tensors, source)
        self._check_probes(extra.get("probes", {}), source, eps_weights)

    def _check_probes(self, probes: dict[str, list[float]], source: str, eps_weights: float) -> None:
        # U_r, V_r are kept in the base weight's dtype: a bf16 base moves the sketch by its eps
        tolerance = max(PROBE_RELATIVE_TOLERANCE, PROBE_WEIGHT_EPS_FACTOR * eps_weights)
        rotated = []
        for name, layer in self.layers.items():
            if name not in probes:
                continue
            sketch, scale = svf.probe(layer.svfit_U, layer.delta_s(), layer.svfit_Vh)
            expected = torch.tensor(probes[name], dtype=torch.float64).reshape(sketch.shape)
            error = (sketch - expected).abs()
            if bool((error > tolerance * scale + 1e-12).any()):
                rotated.append(f"{name} (sketch moved by {float((error / scale.clamp_min(1e-30)).max()):.2g} "
                               "of its scale)")
        if rotated:
            warnings.warn(
                f"{source}: the SVD basis of {len(rotated)} module(s) differs from the one the adapter was "
                f"trained with: {', '.join(rotated[:4])}. Near-equal singular values let the SVD "
                "return a rotated basis on another device, dtype or library, so outputs differ from "
                "training there. Load on the training device and dtype (or merge the adapter into "
                "the weights there) for exact outputs.", stacklevel=3)


def _file_ranks(tensors: dict[str, torch.Tensor], layers: dict[str, Any], source: str) -> dict[str, int]:
    """Each layer's rank in a file: the length of its ``svfit_sigma`` (present: names checked first)."""
    ranks = {}
    for name, layer in layers.items():
        sigma = tensors[f"{name}.svfit_sigma"]
        most = min(matrix_shape(layer))
        if sigma.ndim != 1 or not 1 <= sigma.shape[0] <= most:
            raise AdapterFileError(f"{source}: tensor '{name}.svfit_sigma' must be 1-D with 1 to {most} "
                                   f"values (the rank of '{name}'), got shape {list(sigma.shape)}")
        ranks[name] = sigma.shape[0]
    return ranks


def _eps(dtype: str | torch.dtype) -> float:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
