"""Sampled weight gradients (difftune.sampled_gradients) against closed-form dense references.

Each layer's loss is ⟨y, R⟩ for a fixed random R, so δY = R exactly and the reference
weight gradient is Rᵀ·X (Linear) or conv2d_weight(X, R) (Conv2d), computed in float64
from the very values the layer saw: an independent computation, not difftune's code.
"""

import pytest
import torch
from torch import nn

from difftune.errors import DifftuneError
from difftune.sampled_gradients import GradientPaths, LinearOp, csr_pattern, sampled_product
from difftune.sparse_backprop import SparseBackprop

# "dense": the plain route (the layer's own backward, then a gather); "measure-dense": the
# measured route made to pick the dense product inside SampledLayer
ROUTES = ("sampled", "dense", "auto", "measure-dense")


@pytest.fixture
def route_of(request, monkeypatch):
    """The SparseBackprop mode for a test route (measure-dense: timings that favour dense)."""
    def mode(route: str) -> str:
        if route == "measure-dense":
            import difftune.sampled_gradients as sg

            calls = iter(range(1000))
            monkeypatch.setattr(sg, "_timed", lambda run: (run(), 2.0 if next(calls) % 2 == 0 else 1.0))
            return "measure"
        return route
    return mode


def selection_of(weight: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    count = max(1, int(weight.numel() * density))
    return torch.randperm(weight.numel(), generator=gen)[:count].sort().values


def reference_linear(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor):
    """(weight gradient, input gradient, bias gradient) of ⟨x·Wᵀ + b, R⟩ in float64."""
    x2, r2 = x.double().reshape(-1, x.shape[-1]), r.double().reshape(-1, r.shape[-1])
    return r2.T @ x2, (r.double() @ weight.double()), r2.sum(0)


def reference_conv(x: torch.Tensor, r: torch.Tensor, conv: nn.Conv2d):
    w = conv.weight.detach().double()
    args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    grad_w = torch.nn.grad.conv2d_weight(x.double(), w.shape, r.double(), **args)
    grad_x = torch.nn.grad.conv2d_input(x.shape, w, r.double(), **args)
    return grad_w, grad_x, r.double().sum((0, 2, 3))


def run_layer(layer: nn.Module, x: torch.Tensor, density: float, route: str, with_bias: bool, seed: int = 0):
    """Attach entries to the layer's weight (and bias), take ⟨y, R⟩'s backward; return all we need."""
    layer.requires_grad_(False)
    selection = {"weight": selection_of(layer.weight, density, seed)}
    if with_bias:
        selection["bias"] = selection_of(layer.bias, 0.5, seed + 1)
    holder = nn.ModuleDict({"layer": layer})
    sparse = SparseBackprop(holder, {f"layer.{k}": v for k, v in selection.items()}, weight_gradients=route)
    x = x.clone().requires_grad_(True)
    y = holder["layer"](x)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 7)).to(y.dtype)
    (y.float() * r.float()).sum().backward()
    return sparse, selection, x, r


def assert_matches(sparse, selection, x, r, reference, dtype):
    grad_w, grad_x, grad_b = reference
    exact = dtype == torch.float32
    entries = sparse.entries["layer.weight"]
    picked = grad_w.reshape(-1)[selection["weight"].long()].float()
    sampled = entries.last_route is not None and entries.last_route[1] == "sampled"
    # the sampled route accumulates in float32 also for bf16 inputs; the dense route rounds to bf16
    tol = dict(rtol=1e-4, atol=1e-4) if exact or sampled else dict(rtol=2e-2, atol=2e-2 * picked.abs().max())
    torch.testing.assert_close(entries.delta.grad, picked, **tol)
    loose = dict(rtol=1e-4, atol=1e-4) if exact else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(x.grad.double(), grad_x.to(torch.float64), **loose)
    if "layer.bias" in sparse.entries:
        bias = sparse.entries["layer.bias"]
        torch.testing.assert_close(bias.delta.grad.double(), grad_b[selection["bias"].long()], **loose)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(6,), (2, 5), (2, 3, 4)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.7])
def test_linear_entries_match_the_dense_reference(route, dtype, lead, density, route_of):
    torch.manual_seed(1)
    layer = nn.Linear(24, 40).to(dtype)
    x = torch.randn(*lead, 24).to(dtype)
    sparse, selection, x, r = run_layer(layer, x, density, route_of(route), with_bias=density > 0.1)
    reference = reference_linear(x.detach(), r, layer.weight.detach())
    check_route(sparse, route)
    assert_matches(sparse, selection, x, r, reference, dtype)
    assert layer._parameters["weight"].grad is None and layer._parameters["bias"].grad is None


def check_route(sparse, route):
    taken = sparse.entries["layer.weight"].last_route
    if route == "dense":
        assert taken is None  # the plain route never enters SampledLayer
    else:
        assert taken is not None and taken[1] == {"sampled": "sampled", "measure-dense": "dense"}.get(
            route, taken[1])


CONVS = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3-stride2": dict(kernel_size=3, padding=1, stride=2),
    "1x1": dict(kernel_size=1),
    "3x3-dilated": dict(kernel_size=3, padding=2, dilation=2),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("density", [0.02, 0.3])
def test_conv2d_entries_match_the_dense_reference(route, dtype, conv, density, route_of):
    torch.manual_seed(2)
    layer = nn.Conv2d(6, 10, **CONVS[conv]).to(dtype)
    x = torch.randn(2, 6, 9, 7).to(dtype)
    sparse, selection, x, r = run_layer(layer, x, density, route_of(route), with_bias=True)
    check_route(sparse, route)
    assert_matches(sparse, selection, x, r, reference_conv(x.detach(), r, layer), dtype)


def test_large_batches_are_chunked_and_still_exact(monkeypatch):
    import difftune.sampled_gradients as sg

    monkeypatch.setattr(sg, "_CHUNK_ELEMENTS", 64)  # several chunks of rows / of samples
    torch.manual_seed(3)
    for layer, x, reference in (
        (nn.Linear(16, 12), torch.randn(3, 300, 16), reference_linear),
        (nn.Conv2d(3, 5, 3, padding=1), torch.randn(4, 3, 6, 6), reference_conv),
    ):
        sparse, selection, x, r = run_layer(layer, x, 0.3, "sampled", with_bias=False)
        ref = reference(x.detach(), r, layer.weight.detach() if isinstance(layer, nn.Linear) else layer)
        assert_matches(sparse, selection, x, r, ref, torch.float32)


def test_scale_and_frozen_entries_apply_on_the_sampled_route():
    torch.manual_seed(4)
    layer = nn.Linear(20, 30)
    holder = nn.ModuleDict({"layer": layer})
    layer.requires_grad_(False)
    index = selection_of(layer.weight, 0.1, 0)
    sparse = SparseBackprop(holder, {"layer.weight": index}, weight_gradients="sampled")
    entries = sparse.entries["layer.weight"]
    frozen = torch.zeros(entries.numel, dtype=torch.bool)
    frozen[::3] = True
    entries.set_frozen(frozen)
    sparse.set_scale(0.5)
    x = torch.randn(8, 20)
    r = torch.randn(8, 30)
    (layer(x) * r).sum().backward()
    expected = (r.double().T @ x.double()).reshape(-1)[index] * 0.5
    expected[frozen] = 0
    torch.testing.assert_close(entries.delta.grad.double(), expected, rtol=1e-5, atol=1e-6)
    assert entries.last_route[1] == "sampled"


def test_the_sampled_route_never_builds_the_dense_weight_gradient(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("dense weight gradient computed on the sampled route")

    monkeypatch.setattr(LinearOp, "dense_entries", refuse)
    torch.manual_seed(5)
    layer = nn.Linear(10, 14)
    _, _, x, _ = run_layer(layer, torch.randn(4, 10), 0.1, "sampled", with_bias=False)
    assert x.grad is not None


def test_measure_times_each_layer_shape_once_and_reports_it():
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Conv2d(2, 3, 3, padding=1))
    net.requires_grad_(False)
    selection = {f"{i}.weight": selection_of(net[i].weight, 0.05, i) for i in range(3)}
    sparse = SparseBackprop(net, selection, weight_gradients="measure")
    net[0](net[1](torch.randn(4, 32))).sum().backward()
    net[2](torch.randn(1, 2, 5, 5)).sum().backward()
    routes = {row["tensor"]: row for row in sparse.weight_gradient_routes()}
    assert set(routes) == set(selection)
    # the two Linear layers share shape, rows and density: one measurement
    assert len(sparse.paths.choices) == 2
    for row in routes.values():
        assert row["path"] in ("sampled", "dense") and row["dense_s"] > 0 and row["sampled_s"] > 0
        assert row["path"] == ("sampled" if row["sampled_s"] < row["dense_s"] else "dense")
        assert 0 < row["density"] < 0.1
    sparse.set_weight_gradients("dense")  # the switch: the plain route, no SampledLayer at all
    for e in sparse.entries.values():
        e.last_route = None
    net[0](torch.randn(4, 32)).sum().backward()
    assert sparse.weight_gradient_routes() == []
    with pytest.raises(DifftuneError, match="weight_gradients must be one of"):
        sparse.set_weight_gradients("fast")


def test_auto_follows_the_cost_model_deterministically():
    """Large, sparse layers take the sampled route, small or dense ones the GEMM; every call of a
    shape decides the same (so a resumed run takes the routes of the first)."""
    from difftune.sampled_gradients import modelled_seconds

    torch.manual_seed(9)
    net = nn.ModuleDict({"big": nn.Linear(256, 256), "small": nn.Linear(8, 8), "full": nn.Linear(256, 256)})
    net.requires_grad_(False)
    selection = {"big.weight": selection_of(net["big"].weight, 0.01, 0),
                 "small.weight": selection_of(net["small"].weight, 0.01, 1),
                 "full.weight": selection_of(net["full"].weight, 0.6, 2)}
    sparse = SparseBackprop(net, selection)
    assert sparse.paths.mode == "auto"
    for _ in range(2):
        for name in ("big", "small", "full"):
            net[name](torch.randn(512, net[name].in_features)).sum().backward()
        routes = {row["tensor"]: row for row in sparse.weight_gradient_routes()}
        assert {k: r["path"] for k, r in routes.items()} == {
            "big.weight": "sampled", "small.weight": "dense", "full.weight": "dense"}
    for key, row in routes.items():
        e = sparse.entries[key]
        assert (row["dense_s"], row["sampled_s"]) == modelled_seconds(e._op, e.weight, 512, e.numel)
    # a device without measured rates keeps the GEMM
    key = ("linear", (256, 256), 512, -7, torch.float32, "cuda")
    _, path = sparse.paths.entries(key, lambda: torch.zeros(1), lambda: torch.ones(1), lambda: (1.0, 0.0))
    assert path == "dense"


def test_unsorted_or_grouped_layers_keep_the_plain_route():
    torch.manual_seed(7)
    net = nn.ModuleDict({"grouped": nn.Conv2d(4, 4, 3, groups=2), "fc": nn.Linear(6, 6)})
    net.requires_grad_(False)
    sparse = SparseBackprop(net, {"grouped.weight": torch.tensor([0, 5, 9]),
                                  "fc.weight": torch.tensor([7, 3, 20])}, weight_gradients="sampled")
    net["grouped"](torch.randn(1, 4, 5, 5)).sum().backward()
    net["fc"](torch.randn(2, 6)).sum().backward()
    assert all(e.last_route is None and e.delta.grad is not None for e in sparse.entries.values())


def test_csr_pattern_and_product_against_a_dense_product():
    gen = torch.Generator().manual_seed(8)
    index = torch.randperm(7 * 11, generator=gen)[:20].sort().values
    crow, col = csr_pattern(index, 7, 11)
    rows = torch.repeat_interleave(torch.arange(7), crow.diff().long())
    assert torch.equal(rows * 11 + col.long(), index)
    left, right = torch.randn(13, 7, generator=gen), torch.randn(13, 11, generator=gen)
    expected = (left.T @ right).reshape(-1)[index]
    torch.testing.assert_close(sampled_product(left, right, crow, col, 20), expected)
    assert GradientPaths("sampled").mode == "sampled"
