"""SVFit: rank rules, the layer against an independent fp64 SVD, gradients in closed form,
files (exact reload, refusals, sign flips, near-equal singular values), meta device. The
shared contract on the three tiny families runs in test_adapter_core.py / test_adapter_files.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import single_layer_model
from torch import nn

import difftune
from difftune.tuners.svfit import functional as svf
from difftune.tuners.svfit import layer as svfit_layer


def weight_with_spectrum(out: int, k: int, sigma: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(out, len(sigma), generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(k, len(sigma), generator=gen, dtype=torch.float64))
    return (left * torch.tensor(sigma, dtype=torch.float64)) @ right.T


def linear_with_spectrum(sigma, out=6, k=8, seed=0) -> nn.Sequential:
    """The same Linear for the same arguments: weight with singular values ``sigma``, bias 0.1·i."""
    model = nn.Sequential(nn.Linear(k, out))
    with torch.no_grad():
        model[0].weight.copy_(weight_with_spectrum(out, k, sigma, seed).float())
        model[0].bias.copy_(torch.arange(out) * 0.1)
    return model


def perturb_s(model, std=0.3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in difftune.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * std)


def test_rank_rules():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0])  # σ² = 16, 9, 4, 1: cumulative 16, 25, 29, 30 of 30
    assert svf.rank_for_energy(sigma, 0.5) == 1
    assert svf.rank_for_energy(sigma, 25 / 30) == 2
    assert svf.rank_for_energy(sigma, 0.9) == 3
    assert svf.rank_for_energy(sigma, 1.0) == 4
    assert svf.resolve_rank((6, 8), "full", 0.99, None) == 6
    assert svf.resolve_rank((6, 8), 10, 0.99, None) == 6
    assert svf.resolve_rank((6, 8), 2, 0.99, None) == 2
    model = linear_with_spectrum([4.0, 3.0, 2.0, 1.0])
    difftune.add_adapter(model, "svfit", targets="0", energy=0.9)
    assert model[0].rank == 3
    torch.testing.assert_close(model[0].svfit_sigma, sigma[:3])


def independent_delta(layer) -> torch.Tensor:
    """U_r diag(alpha·(s − σ)) V_rᵀ from our own fp64 SVD of the base weight (sign flips cancel)."""
    w0 = layer.base_layer.weight.detach().double().reshape(layer.base_layer.weight.shape[0], -1)
    u, _, vh = torch.linalg.svd(w0, full_matrices=False)
    r = layer.rank
    d = layer.alpha * (layer.svfit_s - layer.svfit_sigma).detach().double()
    return ((u[:, :r] * d) @ vh[:r]).reshape(layer.base_layer.weight.shape)


@pytest.mark.parametrize("options", [{}, {"rank": 3, "alpha": 2.0}, {"rank": "full", "svd_dtype": "float64"}])
@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
def test_layer_equals_the_paper_weight_in_both_forward_modes(kind, options):
    torch.manual_seed(0)
    model, x = single_layer_model(kind, 10 if kind == "linear" else 4, 7 if kind == "linear" else 6,
                                  tokens=5, size=6)
    before = model(x)
    difftune.add_adapter(model, "svfit", targets="0", **options)
    layer = model[0]
    base = layer.base_layer
    for mode in ("factored", "dense"):
        layer.forward_mode = mode
        assert torch.equal(model(x), before), "s = σ must give the base output exactly"
    perturb_s(model)

    def reference(scale):
        weight = (base.weight.double() + scale * independent_delta(layer)).float()
        if kind == "linear":
            return F.linear(x, weight, base.bias)
        return F.conv2d(x, weight, base.bias, padding=base.padding)

    for scale in (1.0, 0.3):
        difftune.set_adapter_scale(model, scale)
        for mode in ("factored", "dense"):
            layer.forward_mode = mode
            torch.testing.assert_close(model(x), reference(scale), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layer.delta_weight().double(), independent_delta(layer), atol=1e-5, rtol=1e-5)


def test_only_s_trains_and_its_gradient_is_the_closed_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 6))
    x = torch.randn(4, 9)
    difftune.add_adapter(model, "svfit", targets="0", rank=4, alpha=1.5)
    perturb_s(model)
    layer = model[0]
    # dL/ds_i = alpha · u_iᵀ (dL/dW) v_i at the effective weight
    weight = (layer.base_layer.weight + layer.delta_weight()).detach().requires_grad_(True)
    F.linear(x, weight, layer.base_layer.bias).square().sum().backward()
    expected = 1.5 * torch.diagonal(layer.svfit_U.T @ weight.grad @ layer.svfit_Vh.T)
    for mode in ("factored", "dense"):
        layer.forward_mode = mode
        layer.svfit_s.grad = None
        model(x).square().sum().backward()
        assert [n for n, p in model.named_parameters() if p.grad is not None] == ["0.svfit_s"]
        torch.testing.assert_close(layer.svfit_s.grad, expected, atol=1e-4, rtol=1e-4)


def test_full_rank_svd_round_trip_reconstructs_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 7, 3))
    difftune.add_adapter(model, "svfit", targets="0", rank="full")
    layer = model[0]
    rebuilt = (layer.svfit_U * layer.svfit_sigma) @ layer.svfit_Vh
    w0 = layer.base_layer.weight.reshape(7, -1)
    torch.testing.assert_close(rebuilt, w0, atol=1e-5 * float(w0.abs().max()), rtol=0)
    assert layer.rank == 7


def test_sign_flips_of_singular_pairs_change_nothing():
    model = linear_with_spectrum([5.0, 3.0, 2.0, 1.0])
    x = torch.randn(3, 8)
    difftune.add_adapter(model, "svfit", targets="0", rank="full")
    perturb_s(model)
    layer = model[0]
    delta = layer.delta_weight()
    expected = {}
    for mode in ("factored", "dense"):
        layer.forward_mode = mode
        expected[mode] = model(x)
    with torch.no_grad():
        layer.svfit_U[:, [0, 2]] *= -1
        layer.svfit_Vh[[0, 2]] *= -1
    assert torch.equal(layer.delta_weight(), delta)
    for mode in ("factored", "dense"):
        layer.forward_mode = mode
        assert torch.equal(model(x), expected[mode])


def test_reload_is_exact_and_keeps_the_trained_rank(tmp_path, monkeypatch):
    model = linear_with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    x = torch.randn(3, 8)
    difftune.add_adapter(model, "svfit", targets="0", energy=0.95)
    perturb_s(model)
    trained = model(x)
    path = difftune.save_adapter(model, tmp_path / "a.safetensors")
    info = difftune.read_adapter_info(path)
    assert info["extra"]["ranks"] == {"0": model[0].rank} and len(info["extra"]["probes"]["0"]) == 4

    fresh = linear_with_spectrum([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    # even if the energy rule picked another rank at load time, the file's rank is used
    monkeypatch.setattr(svf, "rank_for_energy", lambda sigma, energy: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difftune.load_adapter(fresh, path)
    assert fresh[0].rank == model[0].rank
    assert torch.equal(fresh(x), trained)
    again = difftune.save_adapter(fresh, tmp_path / "b.safetensors")
    from safetensors.torch import load_file
    first, second = load_file(str(path)), load_file(str(again))
    assert first.keys() == second.keys() == {"model.0.svfit_s", "model.0.svfit_sigma"}
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_another_base_is_refused_naming_the_module(tmp_path):
    model = linear_with_spectrum([5.0, 3.0, 2.0, 1.0])
    difftune.add_adapter(model, "svfit", targets="0", rank="full")
    perturb_s(model)
    path = difftune.save_adapter(model, tmp_path / "a.safetensors")
    other = linear_with_spectrum([5.0, 3.0, 2.0, 1.0])
    with torch.no_grad():
        other[0].weight.mul_(1.01)
    with pytest.raises(difftune.BaseModelMismatchError,
                       match=r"a\.safetensors: the singular values of module '0'"):
        difftune.load_adapter(other, path)
    assert not difftune.has_adapter(other)
    assert type(other[0]) is nn.Linear


def test_a_half_precision_copy_of_the_base_is_accepted(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16))
    x = torch.randn(4, 32)
    difftune.add_adapter(model, "svfit", targets="0")
    perturb_s(model, std=0.05)
    trained = model(x)
    path = difftune.save_adapter(model, tmp_path / "a.safetensors")
    half = nn.Sequential(nn.Linear(32, 16))
    half.load_state_dict(difftune.remove_adapter(model).state_dict())
    half.to(torch.bfloat16)
    difftune.load_adapter(half, path)
    torch.testing.assert_close(half(x.bfloat16()).float(), trained, atol=0.05, rtol=0.05)


def test_near_equal_singular_values_reload_exactly_and_a_rotated_basis_warns(tmp_path, monkeypatch):
    spectrum = [3.0, 3.0, 1.0, 0.5]  # σ_1 = σ_2: any rotation of (u_1, u_2), (v_1, v_2) is an SVD
    model = linear_with_spectrum(spectrum, out=4)
    x = torch.randn(3, 8)
    difftune.add_adapter(model, "svfit", targets="0", rank="full")
    with torch.no_grad():
        model[0].svfit_s.add_(torch.tensor([0.5, -0.5, 0.0, 0.0]))
    trained = model(x)
    path = difftune.save_adapter(model, tmp_path / "a.safetensors")

    same = linear_with_spectrum(spectrum, out=4)
    difftune.load_adapter(same, path)
    assert torch.equal(same(x), trained)  # same device, dtype, library: same basis

    real_svd = svf.singular_triplets

    def rotated_svd(matrix, svd_dtype="float32"):
        u, s, vh = real_svd(matrix, svd_dtype)
        c = torch.tensor(0.6, dtype=u.dtype)
        rotation = torch.stack([torch.stack([c, -0.8 + 0 * c]), torch.stack([0.8 + 0 * c, c])])
        u, vh = u.clone(), vh.clone()
        u[:, :2] = u[:, :2] @ rotation
        vh[:2] = rotation.T @ vh[:2]
        return u, s, vh

    monkeypatch.setattr(svfit_layer.svf, "singular_triplets", rotated_svd)
    rotated = linear_with_spectrum(spectrum, out=4)
    with pytest.warns(UserWarning, match=r"SVD basis of 1 module\(s\) differs.*0 \(sketch moved"):
        difftune.load_adapter(rotated, path)
    # the rotated basis is still an SVD of the same weight, but the trained change moved
    torch.testing.assert_close(rotated[0].base_layer.weight.double(),
                               (rotated[0].svfit_U.double() * rotated[0].svfit_sigma.double())
                               @ rotated[0].svfit_Vh.double(), atol=1e-5, rtol=0)
    assert (rotated(x) - trained).abs().max() > 1e-3


def test_meta_device_counts_fixed_ranks_and_refuses_the_energy_rule():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32), nn.Conv2d(8, 16, 3))
    difftune.add_adapter(model, "svfit", targets=r"\d", rank="full")
    assert difftune.count_trainable_parameters(model) == 32 + 16
    difftune.remove_adapter(model)
    with pytest.raises(difftune.DifftuneError,
                       match="svfit at '0': choosing the rank by energy needs the real"):
        difftune.add_adapter(model, "svfit", targets=r"\d")
    assert not difftune.has_adapter(model)
    assert type(model[0]) is nn.Linear and all(p.requires_grad for p in model.parameters())


def test_auto_mode_picks_the_cheaper_form():
    # few positions: factored (r·(K + out) per position) beats building W (out·r·K)
    assert svf.cheaper_mode(positions=8, rank=300, out=320, k=320, training=True) == "factored"
    # thousands of positions at nearly full rank: the dense build is cheaper
    assert svf.cheaper_mode(positions=4096, rank=300, out=320, k=320, training=True) == "dense"
    assert svf.cheaper_mode(positions=4096, rank=4, out=320, k=320, training=True) == "factored"


@pytest.mark.parametrize(("option", "value", "message"), [
    ("rank", 0, "'rank' must be a positive integer, 'full' or unset"),
    ("rank", "half", "'rank' must be a positive integer, 'full' or unset"),
    ("energy", 1.5, r"'energy' must be in \(0, 1\]"),
    ("svd_dtype", "float16", "'svd_dtype' must be one of float32, float64"),
    ("forward_mode", "fast", "'forward_mode' must be one of auto, factored, dense"),
])
def test_bad_options_are_named(option, value, message):
    with pytest.raises(difftune.DifftuneError, match=message):
        difftune.add_adapter(nn.Sequential(nn.Linear(4, 4)), "svfit", targets="0", **{option: value})


def test_cpu_svd_does_not_depend_on_the_thread_count():
    """MKL's SVD differs in the last bits between thread counts; ours runs on one thread."""
    matrix = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = svf.singular_triplets(matrix)
        torch.set_num_threads(1)
        second = svf.singular_triplets(matrix)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.get_num_threads() == threads


def test_full_rank_svfit_is_sixteen_times_smaller_than_lora_rank_8_on_square_weights():
    """The paper's "16× fewer parameters than LoRA": d singular values against 8·(d + d)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(320, 320), nn.Linear(640, 640))
    difftune.add_adapter(model, "svfit", targets=r"\d", rank="full")
    svfit_count = difftune.count_trainable_parameters(model)
    difftune.remove_adapter(model)
    difftune.add_adapter(model, "lora", targets=r"\d", rank=8)
    assert difftune.count_trainable_parameters(model) == 16 * svfit_count == 16 * (320 + 640)


def test_a_load_runs_one_svd_per_layer_at_the_file_rank(tmp_path, monkeypatch):
    """The file's rank is known before the layers are built: one SVD each, even when the config's rule
    would give another rank (formerly: an SVD at the config's rank, then another at the file's)."""
    from conftest import build, denoise, denoiser_inputs, randomize_adapter

    pipe = build("sd")
    adapter = difftune.add_adapter(pipe.unet, "svfit", targets="attn")
    randomize_adapter(pipe.unet)
    inputs = denoiser_inputs(pipe)
    trained = denoise(pipe, inputs)
    path = difftune.save_adapter(pipe.unet, tmp_path / "run")

    calls = []
    original = svf.singular_triplets
    monkeypatch.setattr(svf, "singular_triplets", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(svf, "rank_for_energy", lambda sigma, energy: 1)  # another rule at load time
    fresh = build("sd")
    loaded = difftune.load_adapter(fresh, path)
    assert len(calls) == len(adapter.layers) == len(loaded.layers)
    assert {n: layer.rank for n, layer in loaded.layers.items()} == {
        n: layer.rank for n, layer in adapter.layers.items()}
    assert any(layer.rank > 1 for layer in loaded.layers.values())
    assert torch.equal(denoise(fresh, inputs), trained)
