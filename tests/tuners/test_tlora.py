"""TLoRA: factorisations, tensor-ring math against brute force, the layer against a dense
reference, scale, regulariser, meta device. The shared contract (identity, merge, files on
the three tiny families) runs in test_adapter_core.py / test_adapter_files.py."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import single_layer_model
from torch import nn

import difftune
from difftune.tuners.tlora import functional as tlf
from difftune.tuners.tlora.layer import TLoraLayer


def brute_force_factors(n: int, count: int) -> tuple[int, ...]:
    best = None
    for combo in itertools.product(range(1, n + 1), repeat=count):
        if math.prod(combo) == n and list(combo) == sorted(combo):
            key = sum(f * f for f in combo)
            if best is None or key < best[0]:
                best = (key, combo)
    return best[1]


def test_paper_factorisations_and_balanced_rule():
    assert tlf.factorize(320) == (4, 8, 10) and tlf.factorize(768) == (8, 8, 12)
    assert tlf.factorize(1280) == (8, 10, 16) and tlf.factorize(2048) == (8, 16, 16)
    assert tlf.factorize(32) == (2, 4, 4)
    assert tlf.factorize(37) == (1, 1, 37)  # a prime: T keeps one dense 37 × 37 block
    for n in [1, 12, 30, 36, 48, 64, 96, 100]:
        for count in (2, 3):
            found = tlf.balanced_factors(n, count)
            assert math.prod(found) == n and list(found) == sorted(found)
            assert sum(f * f for f in found) == sum(f * f for f in brute_force_factors(n, count))


def random_cores(factors, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(f, f, rank, rank, generator=gen, dtype=torch.float64) for f in factors]


def trm_by_definition(cores):
    """T[(i), (j)] = trace(A_1[i_1, j_1] ··· A_D[i_D, j_D]), entry by entry."""
    factors = [c.shape[0] for c in cores]
    n = math.prod(factors)
    out = torch.zeros(n, n, dtype=cores[0].dtype)
    for row, i in enumerate(itertools.product(*[range(f) for f in factors])):
        for col, j in enumerate(itertools.product(*[range(f) for f in factors])):
            product = torch.eye(cores[0].shape[-1], dtype=cores[0].dtype)
            for d, core in enumerate(cores):
                product = product @ core[i[d], j[d]]
            out[row, col] = torch.trace(product)
    return out


@pytest.mark.parametrize(("factors", "rank"), [((2, 3), 2), ((2, 2, 3), 2), ((2, 3, 2), 3), ((3,), 2),
                                               ((2, 1, 2, 2), 2)])
def test_trm_dense_and_contraction_match_the_definition(factors, rank):
    cores = random_cores(factors, rank)
    reference = trm_by_definition(cores)
    torch.testing.assert_close(tlf.trm_dense(cores), reference)
    x = torch.randn(5, math.prod(factors), dtype=torch.float64)
    torch.testing.assert_close(tlf.trm_apply(x, cores), x @ reference.T)
    assert tlf.trm_apply_flops(factors, rank) < math.prod(factors) ** 2 * rank ** 3 * len(factors)


def test_rank_one_trm_is_a_kronecker_product():
    cores = random_cores((2, 3, 4), 1)
    kron = torch.kron(torch.kron(cores[0][..., 0, 0], cores[1][..., 0, 0]), cores[2][..., 0, 0])
    torch.testing.assert_close(tlf.trm_dense(cores), kron)


@pytest.mark.parametrize("rank", [1, 2, 3, 6])
def test_identity_initialisation(rank):
    cores = tlf.identity_trm_cores((4, 8, 10), rank, dtype=torch.float64)
    torch.testing.assert_close(tlf.trm_dense(cores), torch.eye(320, dtype=torch.float64), atol=1e-12, rtol=0)
    if rank in (1, 2):  # 1/R is exact in binary: T = I bit for bit
        cores32 = tlf.identity_trm_cores((2, 4, 4), rank)
        assert torch.equal(tlf.trm_dense(cores32), torch.eye(32))
    assert float(tlf.identity_distance(cores)) == 0.0


def test_tensor_ring_residual_matches_the_definition_and_starts_at_zero():
    out_factors, in_factors, rank = (2, 3), (3, 2), 2
    gen = torch.Generator().manual_seed(3)
    out_cores = [torch.randn(f, rank, rank, generator=gen, dtype=torch.float64) for f in out_factors]
    in_cores = [torch.randn(f, rank, rank, generator=gen, dtype=torch.float64) for f in in_factors]
    expected = torch.zeros(6, 6, dtype=torch.float64)
    for row, o in enumerate(itertools.product(range(2), range(3))):
        for col, i in enumerate(itertools.product(range(3), range(2))):
            chain = out_cores[0][o[0]] @ out_cores[1][o[1]] @ in_cores[0][i[0]] @ in_cores[1][i[1]]
            expected[row, col] = torch.trace(chain)
    torch.testing.assert_close(tlf.tr_dense(out_cores, in_cores), expected)
    up, down = tlf.tr_factors(out_cores, in_cores)
    assert up.shape == (6, rank * rank) and down.shape == (rank * rank, 6)

    zero_out, init_in = tlf.init_tr_cores((4, 8, 10), (8, 8, 12), 6, generator=gen)
    assert torch.count_nonzero(tlf.tr_dense(zero_out, init_in)) == 0
    assert all(c.abs().sum() > 0 for c in zero_out[1:] + init_in)


def reference_weight(layer: TLoraLayer, scale: float = 1.0) -> torch.Tensor:
    """W0 + scale·(W0·(T ⊗ I_k) − W0 + s·Δ), with T and Δ from the definitions (not the layer's code)."""
    base = layer.base_layer
    w0 = base.weight.detach().double().reshape(base.weight.shape[0], -1)
    transform = trm_by_definition([c.detach().double() for c in layer.tlora_transform])
    taps = 1 if isinstance(base, nn.Linear) else base.kernel_size[0] * base.kernel_size[1]
    transformed = w0 @ torch.kron(transform, torch.eye(taps, dtype=torch.float64))
    if layer.residual == "tr":
        residual = tlf.tr_dense([c.detach().double() for c in layer.tlora_residual_out],
                                [c.detach().double() for c in layer.tlora_residual_in])
    else:
        residual = layer.tlora_lora_B.detach().double() @ layer.tlora_lora_A.detach().double()
    delta = transformed - w0 + layer.residual_scale * residual
    return (w0 + scale * delta).reshape(base.weight.shape)


def perturb(model, std=0.1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in difftune.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.mark.parametrize("residual", ["tr", "lora"])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
def test_layer_equals_the_dense_formula_in_both_forward_modes(kind, residual):
    torch.manual_seed(0)
    model, x = single_layer_model(kind, 24 if kind == "linear" else 8, 12, tokens=7, size=9, stride=2)
    before = model(x)
    difftune.add_adapter(model, "tlora", targets="0", transform_rank=2, residual=residual, rank=3, alpha=1.5)
    layer = model[0]
    assert layer.residual_scale == pytest.approx(1.5 / math.sqrt(3))
    for mode in ("factored", "dense"):
        layer.forward_mode = mode
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)
    perturb(model)
    base = layer.base_layer

    def reference_output(scale):
        weight = reference_weight(layer, scale).float()
        if kind == "linear":
            return F.linear(x, weight, base.bias)
        return F.conv2d(x, weight, base.bias, stride=2, padding=base.padding)

    for scale in (1.0, 0.4):
        difftune.set_adapter_scale(model, scale)
        for mode in ("factored", "dense"):
            layer.forward_mode = mode
            torch.testing.assert_close(model(x), reference_output(scale), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.delta_weight().double() * scale + base.weight.double(),
                                   reference_weight(layer, scale), atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_cores_and_agree_between_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(4, 16)
    difftune.add_adapter(model, "tlora", targets="0", transform_rank=2, rank=2)
    perturb(model)
    grads = {}
    for mode in ("factored", "dense"):
        model[0].forward_mode = mode
        for p in model.parameters():
            p.grad = None
        model(x).square().sum().backward()
        grads[mode] = {n: p.grad.clone() for n, p in difftune.named_trainable_parameters(model)}
        assert model[0].base_layer.weight.grad is None and model[0].base_layer.bias.grad is None
    names = set(grads["dense"])
    assert names == {n for n, _ in model.named_parameters() if "tlora_" in n}
    for name in names:
        torch.testing.assert_close(grads["factored"][name], grads["dense"][name], atol=1e-4, rtol=1e-4)


def test_parameter_count_closed_form():
    model = nn.Sequential(nn.Linear(320, 640), nn.Linear(768, 320))
    difftune.add_adapter(model, "tlora", targets=r"\d", transform_rank=2, residual="tr", rank=6)
    # TRM: R²·Σ I_d² over the input factors; TR: R²·(Σ O_d + Σ I_d)
    trm = 4 * (16 + 64 + 100) + 4 * (64 + 64 + 144)
    tr = 36 * ((8 + 8 + 10) + (4 + 8 + 10)) + 36 * ((4 + 8 + 10) + (8 + 8 + 12))
    assert difftune.count_trainable_parameters(model) == trm + tr
    difftune.remove_adapter(model)
    difftune.add_adapter(model, "tlora", targets=r"\d", transform_rank=1, residual="lora", rank=4)
    trm = (16 + 64 + 100) + (64 + 64 + 144)
    assert difftune.count_trainable_parameters(model) == trm + 4 * (320 + 640) + 4 * (768 + 320)


def test_default_residual_rank_follows_the_paper():
    model = nn.Sequential(nn.Linear(8, 8))
    assert difftune.add_adapter(model, "tlora", targets="0").config.effective_rank == 6
    difftune.remove_adapter(model)
    assert difftune.add_adapter(model, "tlora", targets="0", residual="lora").config.effective_rank == 4


def test_identity_regulariser_is_off_by_default_and_pulls_cores_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    assert difftune.add_adapter(model, "tlora", targets="0").regularization_loss() is None
    difftune.remove_adapter(model)
    adapter = difftune.add_adapter(model, "tlora", targets="0", identity_reg=0.5)
    assert adapter.regularization_loss().item() == 0.0
    perturb(model)
    cores = list(model[0].tlora_transform)
    with torch.no_grad():
        identity_points = [torch.eye(c.shape[0])[:, :, None, None] / 2 for c in cores]
        pairs = zip(cores, identity_points, strict=True)
        expected = 0.5 * sum(float(torch.linalg.norm((c - i).flatten())) for c, i in pairs)
    loss = adapter.regularization_loss()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    before = [c.detach().clone() for c in cores]
    with torch.no_grad():
        for c in cores:
            c -= 0.01 * c.grad
    assert adapter.regularization_loss().item() < loss.item()
    assert all(not torch.equal(a, b) for a, b in zip(before, cores, strict=True))


def test_attaches_on_the_meta_device_and_refuses_grouped_convs():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(640, 320), nn.Conv2d(8, 8, 3, groups=2))
    difftune.add_adapter(model, "tlora", targets="0")
    assert all(p.is_meta for p in difftune.trainable_parameters(model))
    difftune.remove_adapter(model)
    with pytest.raises(difftune.TargetError,
                       match=r"tlora cannot adapt grouped convolutions: 1 \(Conv2d groups=2\)"):
        difftune.add_adapter(model, "tlora", targets="1")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("option", "value", "message"), [
    ("residual", "cp", "'residual' must be one of tr, lora"),
    ("transform_rank", 0, "'transform_rank' must be a positive integer"),
    ("rank", 2.5, "'rank' must be a positive integer"),
    ("forward_mode", "fast", "'forward_mode' must be one of auto, factored, dense"),
    ("identity_reg", -1.0, "'identity_reg' must be >= 0"),
])
def test_bad_options_are_named(option, value, message):
    with pytest.raises(difftune.DifftuneError, match=message):
        difftune.add_adapter(nn.Sequential(nn.Linear(4, 4)), "tlora", targets="0", **{option: value})
