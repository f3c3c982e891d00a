"""Sampled weight gradients: only the trained entries of a layer's weight gradient.

A layer y = x·Wᵀ (+ b) whose weight has a few trained entries (SaRA, or any method that
trains chosen entries through `difftune.sparse_backprop`) needs, for each trained entry
(o, i), only Σₙ δY[n, o]·X[n, i]. The dense route computes the whole product δYᵀ·X
(out·in·N multiply-adds) and gathers the entries; the sampled route computes the nnz dot
products alone (a sampled dense-dense product, `torch.sparse.sampled_addmm` on the CSR
pattern of the trained entries: nnz·N multiply-adds, at a lower rate than a GEMM). A
Conv2d's weight gradient is the same product on the unfolded input (im2col), the kernel
read as out × (in·kh·kw).

Which route is faster depends on the density, the layer's sides, the number of rows N and
the machine. ``"auto"`` decides per call with a cost model whose rates were measured on a
CPU (`CPU_RATES`; benchmarks/memory_sara.py prints both routes' times per layer shape):
deterministic, so a run and its resume take the same routes. On other devices ``"auto"``
keeps the dense route until rates are measured there. ``"measure"`` times both routes once
per (shape, rows, density) and keeps the faster (for calibrating; the choice can differ
between runs). ``"sampled"`` and ``"dense"`` force a route (``"dense"`` is difftune's earlier
path: the layer's own backward, then a gather). Both routes give the same gradient to float
tolerance; the sampled one accumulates in float32 also for bf16/fp16 activations.

This module is the math and the choice; `sparse_backprop` decides when a layer uses it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import DifftuneError

PATHS = ("auto", "measure", "sampled", "dense")
# temporaries of one sampled product stay below this many elements (rows are chunked)
_CHUNK_ELEMENTS = 1 << 23


def check_path(path: str, source: str = "weight_gradients") -> str:
    if path not in PATHS:
        raise DifftuneError(f"{source} must be one of {', '.join(PATHS)}, got {path!r}")
    return path


# --- the sampled product -------------------------------------------------------------------

def csr_pattern(index: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow, col) of the sorted flat positions ``index`` in a rows × cols matrix."""
    dtype = torch.int32 if rows * cols < 2**31 else torch.int64
    index = index.to(dtype)
    row = torch.div(index, cols, rounding_mode="floor")
    col = index - row * cols
    crow = torch.zeros(rows + 1, dtype=dtype, device=index.device)
    crow[1:] = torch.bincount(row, minlength=rows).cumsum(0)
    return crow, col


def _sampled_addmm(crow, col, values, shape, left, right, beta: float) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, left, right, beta=beta).values()


def sampled_product(left_t: torch.Tensor, right: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                    nnz: int) -> torch.Tensor:
    """The entries (crow, col) of ``left_tᵀ·right`` in float32, left_t (N, R), right (N, C).

    N is cut into chunks so that the float32 copies the product makes stay small.
    """
    rows, cols = left_t.shape[1], right.shape[1]
    step = max(256, _CHUNK_ELEMENTS // max(1, rows + cols))
    values = torch.zeros(nnz, dtype=torch.float32, device=right.device)
    for start in range(0, left_t.shape[0], step):
        left = left_t[start:start + step].float().T
        values = _sampled_addmm(crow, col, values, (rows, cols), left, right[start:start + step].float(),
                                beta=0.0 if start == 0 else 1.0)
    return values


def _sampled_conv_product(x: torch.Tensor, grad: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                          nnz: int, op: Conv2dOp, shape: tuple[int, ...]) -> torch.Tensor:
    """The (crow, col) entries of the conv weight gradient, from the unfolded input, a few
    samples at a time (the im2col copy of a whole batch can be large)."""
    out_ch = shape[0]
    cols = math.prod(shape[1:])
    batch = x.shape[0]
    positions = grad.shape[2] * grad.shape[3]
    per_sample = (cols + out_ch) * positions
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    values = torch.zeros(nnz, dtype=torch.float32, device=x.device)
    for start in range(0, batch, step):
        xs = x[start:start + step].float()
        n = xs.shape[0]
        unfolded = F.unfold(xs, shape[2:], dilation=op.dilation, padding=op.padding, stride=op.stride)
        # (cols, n·L) contiguous, passed transposed: the kernel reads its rows directly
        right = unfolded.permute(1, 0, 2).reshape(cols, n * positions).T
        left = grad[start:start + step].float().reshape(n, out_ch, positions).permute(1, 0, 2)
        values = _sampled_addmm(crow, col, values, (out_ch, cols), left.reshape(out_ch, n * positions),
                                right, beta=0.0 if start == 0 else 1.0)
    return values


# --- the layers ----------------------------------------------------------------------------

class LinearOp:
    """y = x·Wᵀ + b over the last dimension (any number of leading dimensions)."""

    kind = "linear"

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def input_gradient(self, grad, x, weight):
        return grad.matmul(weight.to(grad.dtype))

    def bias_gradient(self, grad):
        return grad.reshape(-1, grad.shape[-1]).sum(0)

    def rows(self, x) -> int:
        return x.numel() // x.shape[-1]

    def dense_entries(self, grad, x, weight, index):
        g = grad.reshape(-1, grad.shape[-1])
        dense = g.T.matmul(x.reshape(-1, x.shape[-1]).to(g.dtype))
        return dense.reshape(-1).index_select(0, index)

    def sampled_entries(self, grad, x, weight, index):
        shape = weight.shape
        crow, col = csr_pattern(index, shape[0], shape[1])
        return sampled_product(grad.reshape(-1, shape[0]), x.reshape(-1, shape[1]), crow, col, index.numel())


@dataclass(frozen=True)
class Conv2dOp:
    """A zero-padded, ungrouped Conv2d with numeric padding."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kind: str = "conv2d"

    def forward(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def _backward(self, grad, x, weight, mask):
        return torch.ops.aten.convolution_backward(
            grad, x.to(grad.dtype), weight.to(grad.dtype), None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0, 0], 1, mask)

    def input_gradient(self, grad, x, weight):
        return self._backward(grad, x, weight, [True, False, False])[0]

    def bias_gradient(self, grad):
        return grad.sum((0, 2, 3))

    def rows(self, x) -> int:
        return x.shape[0] * x.shape[2] * x.shape[3]

    def dense_entries(self, grad, x, weight, index):
        dense = self._backward(grad, x, weight, [False, True, False])[1]
        return dense.contiguous().reshape(-1).index_select(0, index)

    def sampled_entries(self, grad, x, weight, index):
        shape = tuple(weight.shape)
        crow, col = csr_pattern(index, shape[0], math.prod(shape[1:]))
        return _sampled_conv_product(x, grad, crow, col, index.numel(), self, shape)


def layer_op(module: torch.nn.Module) -> LinearOp | Conv2dOp | None:
    """The op a module's plain forward computes, or None when the sampled route does not apply."""
    if isinstance(module, torch.nn.Linear):
        return LinearOp()
    if (isinstance(module, torch.nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)):
        return Conv2dOp(tuple(module.stride), tuple(module.padding), tuple(module.dilation))
    return None


# --- the choice, per layer shape ------------------------------------------------------------

@dataclass(frozen=True)
class CostRates:
    """Seconds per unit of work of the two routes (one CPU thread; fitted to timings of SD 1.5 layer
    shapes with torch 2.13: dense GEMM ≈ 45 GMAC/s, sampled dots ≈ 8 GMAC/s, and the sampled
    route's transposed copies of the input and output gradient ≈ 1 ns per element)."""

    gemm_mac: float = 1 / 45e9
    sampled_mac: float = 0.13e-9
    sampled_copy: float = 1.0e-9
    call: float = 20e-6


CPU_RATES = CostRates()


def modelled_seconds(op, weight: torch.Tensor, rows: int, nnz: int,
                     rates: CostRates = CPU_RATES) -> tuple[float, float]:
    """(dense, sampled) seconds the cost model predicts for one weight gradient."""
    out_side = weight.shape[0]
    in_side = weight.numel() // out_side  # in·kh·kw for a conv kernel (its unfolded input)
    dense = out_side * in_side * rows * rates.gemm_mac + rates.call
    sampled = nnz * rows * rates.sampled_mac + (out_side + in_side) * rows * rates.sampled_copy + rates.call
    return dense, sampled


@dataclass
class PathChoice:
    """What was decided for one layer shape, and the two (measured or modelled) times behind it."""

    path: str
    dense_s: float | None = None
    sampled_s: float | None = None


@dataclass
class GradientPaths:
    """The route per call: forced, modelled (auto) or measured once per (op, shape, rows, density)."""

    mode: str = "auto"
    choices: dict[tuple, PathChoice] = field(default_factory=dict)

    def __post_init__(self):
        check_path(self.mode)

    @staticmethod
    def key(op, weight: torch.Tensor, rows: int, nnz: int, dtype: torch.dtype) -> tuple:
        density_bucket = round(2 * math.log2(nnz / weight.numel()))  # within √2 of each other
        return (op.kind, tuple(weight.shape), rows, density_bucket, dtype, weight.device.type)

    def entries(self, key: tuple, dense: Callable[[], torch.Tensor], sampled: Callable[[], torch.Tensor],
                modelled: Callable[[], tuple[float, float]]) -> tuple[torch.Tensor, str]:
        if self.mode in ("sampled", "dense"):
            return (sampled() if self.mode == "sampled" else dense()), self.mode
        known = self.choices.get(key)
        if known is None and self.mode == "auto":
            if key[-1] == "cpu":
                dense_s, sampled_s = modelled()
                known = PathChoice("sampled" if sampled_s < dense_s else "dense", dense_s, sampled_s)
            else:  # no measured rates for this device yet: the dense GEMM
                known = PathChoice("dense")
            self.choices[key] = known
        if known is not None:
            return (sampled() if known.path == "sampled" else dense()), known.path
        results, times = {}, {"dense": math.inf, "sampled": math.inf}
        for name, run in (("sampled", sampled), ("dense", dense)) * 2:
            results[name], seconds = _timed(run)
            times[name] = min(times[name], seconds)
        path = "sampled" if times["sampled"] < times["dense"] else "dense"
        self.choices[key] = PathChoice(path, times["dense"], times["sampled"])
        return results[path], path


def _timed(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    result = run()
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return result, time.perf_counter() - start


class SampledLayer(torch.autograd.Function):
    """A Linear/Conv2d whose trained weight entries get their gradient by the chosen route.

    Inputs: the layer input, the (already written) dense weight, the bias (or None), the
    1-D delta (so that autograd reaches it) and ``entries``, which owns the index, the
    route and the finishing of the gradient (scale, frozen entries).
    """

    @staticmethod
    def forward(ctx: Any, x, weight, bias, delta, op, entries):
        ctx.save_for_backward(x, weight)
        ctx.op, ctx.entries = op, entries
        return op.forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad):
        x, weight = ctx.saved_tensors
        op = ctx.op
        need_x, _, need_bias, need_delta = ctx.needs_input_grad[:4]
        grad_x = op.input_gradient(grad, x, weight) if need_x else None
        grad_bias = op.bias_gradient(grad) if need_bias else None
        grad_delta = ctx.entries.sampled_gradient(op, grad, x, weight) if need_delta else None
        return grad_x, None, grad_bias, grad_delta, None, None
