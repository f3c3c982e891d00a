"""SaRA: selection, training hooks, progressive adjustment, files and exact resume.

Each behaviour is compared with an independent computation (a mask computed here, a
dense AdamW reference, the nuclear norm from torch.linalg). The official code's
faults each have a test: progressive adjustment off, clipping through
model.parameters(), resume, compact masks, a low-rank term that acts, and a file that
really changes the images.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import build, denoiser_inputs, generate
from torch import nn

import difftune
from difftune.tuners.sara import SaraAdapter, auto_learning_rate
from difftune.tuners.sara.low_rank import is_eligible, nuclear_norm_subgradient

SD = {"budget": 0.05, "lambda_rank": 0.0, "progressive_step": None}


def mlp(seed: int = 0) -> nn.Module:
    """Two eligible matrices (both sides > 64) for the low-rank term."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(72, 96), nn.GELU(), nn.Linear(96, 80), nn.GELU(), nn.Linear(80, 8))


def mlp_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 72, generator=gen)
    return x, torch.sin(x[:, :8] * 3)


def train_mlp(model, adapter, steps, lr=1e-2, weight_decay=0.0, optimizer=None, max_steps=None):
    optimizer = optimizer or torch.optim.AdamW(adapter.optimizer_parameter_groups(weight_decay), lr=lr)
    for step in range(steps):
        x, y = mlp_batch(step)
        loss = F.mse_loss(model(x), y)
        extra = adapter.regularization_loss()
        (loss if extra is None else loss + extra).backward()
        adapter.before_optimizer_step(step + 1, max_steps or steps)
        optimizer.step()
        adapter.after_optimizer_step(step + 1, max_steps or steps, optimizer)
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def unet_step(pipe, adapter, optimizer, step, max_steps):
    """One step of a minimal loop on the public API and the training hooks."""
    inputs = denoiser_inputs(pipe, seed=step)
    target = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(500 + step))
    loss = F.mse_loss(pipe.unet(**inputs).sample, target)
    extra = adapter.regularization_loss()
    (loss if extra is None else loss + extra).backward()
    adapter.before_optimizer_step(step + 1, max_steps)
    torch.nn.utils.clip_grad_norm_(pipe.unet.parameters(), 1.0)
    optimizer.step()
    adapter.after_optimizer_step(step + 1, max_steps, optimizer)
    optimizer.zero_grad(set_to_none=True)


def optimizer_for(adapter, lr=5e-3):
    return torch.optim.AdamW(adapter.optimizer_parameter_groups(1e-2), lr=lr)


def weights(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "sparse_" not in k}


# --- selection ---------------------------------------------------------------------------

def test_threshold_selects_exactly_the_small_magnitudes():
    pipe = build("sd")
    base = weights(pipe.unet)
    theta = 0.01
    adapter = difftune.add_adapter(pipe.unet, "sara", threshold=theta, lambda_rank=0.0)
    layers = [n for n, m in pipe.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    expected = {f"{n}.weight": torch.nonzero(base[f"{n}.weight"].abs().reshape(-1) < theta).reshape(-1)
                for n in layers}
    expected = {k: v for k, v in expected.items() if v.numel()}
    assert adapter.entries.keys() == expected.keys()
    for key, index in expected.items():
        assert torch.equal(adapter.entries[key].index.long(), index)
    assert adapter.threshold == pytest.approx(theta)
    assert adapter.default_learning_rate() == pytest.approx(1e-3 * math.exp(-350 * theta))


def test_budget_is_an_exact_global_quantile_and_masks_are_compact():
    pipe = build("sd")
    base = weights(pipe.unet)
    adapter = difftune.add_adapter(pipe.unet, "sara", budget=1234)
    magnitudes = torch.cat([v.abs().reshape(-1) for k, v in base.items()
                            if k in _candidates(pipe.unet, include_bias_norm=False)]).sort().values
    assert adapter.num_selected == 1234
    assert adapter.threshold == magnitudes[1234].item()
    difftune.remove_adapter(pipe.unet)

    candidates = _candidates(pipe.unet, include_bias_norm=True)
    adapter = difftune.add_adapter(pipe.unet, "sara", budget=0.5, include_bias_norm=True)
    assert set(adapter.entries) <= candidates
    assert any(k.endswith(".bias") for k in adapter.entries) and any("norm" in k for k in adapter.entries)
    magnitudes = torch.cat([base[k].abs().reshape(-1) for k in sorted(candidates)])
    assert adapter.num_selected == int((magnitudes < adapter.threshold).sum())
    difftune.remove_adapter(pipe.unet)
    assert all(torch.equal(v, base[k]) for k, v in weights(pipe.unet).items())

    adapter = difftune.add_adapter(pipe.unet, "sara", budget=0.05)
    total = sum(v.numel() for k, v in base.items() if k in _candidates(pipe.unet, include_bias_norm=False))
    assert adapter.num_selected == round(0.05 * total)
    # 4 bytes per selected entry, not one byte per weight of the model
    assert adapter.mask_bytes() == 4 * adapter.num_selected < total
    file_masks = {k: v for k, v in adapter.adapter_state_dict().items() if "mask" in k}
    assert sum(v.numel() * v.element_size() for v in file_masks.values()) <= 4 * adapter.num_selected


def _candidates(model, include_bias_norm):
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            names.add(f"{name}.weight")
            if include_bias_norm and module.bias is not None:
                names.add(f"{name}.bias")
        elif include_bias_norm and "Norm" in type(module).__name__:
            names.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def test_options_are_checked_and_named():
    model = build("sd").unet
    for options, message in [({"budget": 0}, "'budget'"), ({"budget": 12.5}, "'budget'"),
                             ({"threshold": -1.0}, "'threshold'"), ({"rank_samples": 0}, "'rank_samples'"),
                             ({"progressive_step": 2.5}, "'progressive_step'"),
                             ({"progressive_step": -1}, "'progressive_step'"),
                             ({"lambda_rank": -1.0}, "'lambda_rank'"),
                             ({"weight_gradients": "fast"}, "'weight_gradients'"),
                             ({"threshold": 1e-30}, "selects no entry")]:
        with pytest.raises(difftune.DifftuneError, match=message):
            difftune.add_adapter(model, "sara", **options)
        assert not difftune.has_adapter(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_routes_give_the_same_unet_gradients(dtype):
    """Sampled, dense and measured routes on the tiny UNet (3-D attention inputs, 4-D convs):
    the same delta gradients, and no dense weight gradient kept on any route."""
    grads = {}
    for route in ("dense", "sampled", "auto", "measure"):
        pipe = build("sd")
        pipe.unet.to(dtype)
        adapter = difftune.add_adapter(pipe.unet, "sara", weight_gradients=route, **SD)
        with torch.no_grad():
            for e in adapter.entries.values():
                gen = torch.Generator().manual_seed(e.numel)
                e.delta.copy_(torch.randn(e.delta.shape, generator=gen) * 1e-2)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in denoiser_inputs(pipe).items()}
        pipe.unet(**inputs).sample.float().square().mean().backward()
        grads[route] = {k: e.delta.grad.clone() for k, e in adapter.entries.items()}
        kinds = {row["path"] for row in adapter.sparse.weight_gradient_routes()}
        assert kinds == set() if route == "dense" else kinds <= {"sampled", "dense"} and kinds
        assert all(p.grad is None for n, p in pipe.unet.named_parameters() if "sparse_delta" not in n)
    tol = {} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.05}
    for route in ("sampled", "auto", "measure"):
        for key, grad in grads["dense"].items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(grads[route][key] / scale, grad / scale, **tol)


def test_auto_learning_rate_is_the_papers_rule():
    assert auto_learning_rate(2e-3) == pytest.approx(4.966e-4, rel=1e-3)
    assert auto_learning_rate(2e-4) == pytest.approx(1e-3 * math.exp(-0.07))


# --- training -----------------------------------------------------------------------------

def test_training_equals_adamw_on_the_selected_absolute_values():
    """Dense reference: Adam on the values W[M] themselves, then v ← v·(1 − lr·wd)."""
    model = mlp()
    base = weights(model)
    adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.2, lambda_rank=0.0,
                                   progressive_step=None)
    train_mlp(model, adapter, steps=5, lr=1e-2, weight_decay=0.5)

    index = {k: e.index.long() for k, e in adapter.entries.items()}
    values = {k: base[k].reshape(-1)[i].clone().requires_grad_(True) for k, i in index.items()}
    reference = torch.optim.AdamW(list(values.values()), lr=1e-2, weight_decay=0.0)
    plain = mlp()
    for step in range(5):
        params = dict(base)
        for k, v in values.items():
            params[k] = base[k].reshape(-1).index_put((index[k],), v).reshape(base[k].shape)
        x, y = mlp_batch(step)
        F.mse_loss(torch.func.functional_call(plain, params, (x,)), y).backward()
        reference.step()
        reference.zero_grad()
        with torch.no_grad():
            for v in values.values():
                v.mul_(1 - 1e-2 * 0.5)
    trained = weights(model)
    for key, e in adapter.entries.items():
        torch.testing.assert_close(e.values(), values[key].detach(), atol=2e-6, rtol=1e-5)
        untouched = torch.ones(base[key].numel(), dtype=torch.bool)
        untouched[index[key]] = False
        assert torch.equal(trained[key].reshape(-1)[untouched], base[key].reshape(-1)[untouched])


def test_model_parameters_reach_the_values_and_clipping_clips_them():
    pipe = build("sd")
    adapter = difftune.add_adapter(pipe.unet, "sara", **SD)
    inputs = denoiser_inputs(pipe)
    pipe.unet(**inputs).sample.square().mean().backward()
    deltas = {id(p) for _, p in adapter.named_trainable_parameters()}
    assert deltas <= {id(p) for p in pipe.unet.parameters()}
    grads = torch.cat([p.grad for _, p in adapter.named_trainable_parameters()])
    norm = torch.nn.utils.clip_grad_norm_(pipe.unet.parameters(), max_norm=1e-3)
    assert norm == pytest.approx(float(grads.norm()), rel=1e-5) and norm > 1e-3
    clipped = torch.cat([p.grad for _, p in adapter.named_trainable_parameters()])
    assert float(clipped.norm()) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("shape", [(200, 100), (100, 200), (150, 150), (400, 100)])
def test_nuclear_norm_subgradient_is_u_v_transposed(shape):
    gen = torch.Generator().manual_seed(0)
    sparse = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.06)
    low_rank = torch.randn(shape[0], 5, generator=gen) @ torch.randn(5, shape[1], generator=gen)
    assert torch.linalg.matrix_rank(low_rank) == 5
    for matrix in (sparse, low_rank):
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        rank = int((s > s[0] * 1e-4).sum())  # U Vᵀ over the non-zero singular values
        gradient, value = nuclear_norm_subgradient(matrix)
        torch.testing.assert_close(gradient.double(), u[:, :rank] @ vh[:rank], atol=1e-5, rtol=0)
        assert value == pytest.approx(float(s.sum()), rel=1e-6)


def test_low_rank_term_value_and_gradient_match_the_nuclear_norm():
    model = mlp()
    adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.3, lambda_rank=0.1,
                                   rank_samples=2, progressive_step=None)
    assert sorted(adapter.eligible) == ["0.weight", "2.weight"]
    with torch.no_grad():
        for _, p in adapter.named_trainable_parameters():
            p.normal_(0, 0.05)
    loss = adapter.regularization_loss()
    assert adapter.regularization_loss() is not None and adapter.draws == 1  # cached for the step
    loss.backward()
    expected = 0.0
    for key in adapter.eligible:
        e = adapter.entries[key]
        dense = torch.zeros(e.shape, dtype=torch.float64)
        dense.view(-1)[e.index.long()] = e.values().double()
        masked = dense.clone().requires_grad_(True)
        norm = torch.linalg.matrix_norm(masked, ord="nuc")
        norm.backward()
        expected += float(norm)
        torch.testing.assert_close(e.delta.grad.double(), 0.1 * masked.grad.view(-1)[e.index.long()],
                                   atol=1e-6, rtol=1e-4)
    assert loss.item() == pytest.approx(0.1 * expected, rel=1e-5)


def test_low_rank_term_changes_the_update_and_lowers_the_nuclear_norm():
    def trained(lambda_rank):
        model = mlp()
        adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.3, lambda_rank=lambda_rank,
                                       rank_samples=2, progressive_step=None)
        train_mlp(model, adapter, steps=30, lr=1e-2)
        norms = 0.0
        for key in adapter.eligible:
            e = adapter.entries[key]
            dense = torch.zeros(e.shape)
            dense.view(-1)[e.index.long()] = e.values()
            norms += float(torch.linalg.matrix_norm(dense, ord="nuc"))
        return torch.cat([e.delta.detach() for e in adapter.entries.values()]), norms

    plain_update, plain_norm = trained(0.0)
    ranked_update, ranked_norm = trained(0.05)
    assert (plain_update - ranked_update).abs().max() > 1e-3
    assert ranked_norm < plain_norm - 0.05 * abs(plain_norm)


def test_progressive_adjustment_freezes_grown_entries_and_keeps_moments_and_update():
    def run(progressive_step, stop):
        model = mlp()
        adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.3, lambda_rank=0.0,
                                       progressive_step=progressive_step)
        optimizer = train_mlp(model, adapter, steps=stop, lr=3e-2, weight_decay=1e-2, max_steps=8)
        return adapter, optimizer

    twin, twin_optimizer = run(None, 4)          # no adjustment, stopped at step 4
    adapter, optimizer = run(0.5, 4)            # adjustment after step 4 of 8
    assert adapter.config.progressive_at(8) == 4 and adapter.stage == 1 and twin.stage == 0
    for key, e in adapter.entries.items():
        t = twin.entries[key]
        assert torch.equal(e.delta, t.delta)      # the step's update was kept
        grown = t.values().abs() >= adapter.threshold
        assert torch.equal(e.frozen, grown)        # independent: |W| >= θ at step 4
        for name in ("exp_avg", "exp_avg_sq"):
            kept, before = optimizer.state[e.delta][name], twin_optimizer.state[t.delta][name]
            assert torch.equal(kept[~grown], before[~grown]) and not kept[grown].any()
    assert 0 < sum(int(e.frozen.sum()) for e in adapter.entries.values()) < adapter.num_selected

    frozen_values = {k: e.delta.detach().clone() for k, e in adapter.entries.items()}
    for step in range(4, 8):  # continue to the end
        x, y = mlp_batch(step)
        F.mse_loss(adapter.model(x), y).backward()
        adapter.before_optimizer_step(step + 1, 8)
        optimizer.step()
        adapter.after_optimizer_step(step + 1, 8, optimizer)
        optimizer.zero_grad()
    for key, e in adapter.entries.items():
        assert torch.equal(e.delta[e.frozen], frozen_values[key][e.frozen])
        assert not torch.equal(e.delta[~e.frozen], frozen_values[key][~e.frozen])


def test_progressive_off_trains_and_decay_in_the_optimizer_is_refused_with_progressive():
    model = mlp()
    adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.3, progressive_step=0)
    before = weights(model)
    train_mlp(model, adapter, steps=3)
    assert adapter.stage == 0 and any(not torch.equal(v, before[k]) for k, v in weights(model).items())

    model = mlp()
    adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.3)
    optimizer = torch.optim.AdamW(difftune.trainable_parameters(model), lr=1e-3, weight_decay=1e-2)
    with pytest.raises(difftune.DifftuneError, match="optimizer_parameter_groups"):
        train_mlp(model, adapter, steps=1, optimizer=optimizer)


# --- files ----------------------------------------------------------------------------------

def trained_pipeline(tmp_path, name="run", steps=4, seed=0, **options):
    pipe = build("sd", seed=seed)
    adapter = difftune.add_adapter(pipe.unet, "sara", **{"budget": 0.05, "progressive_step": 2, **options})
    optimizer = optimizer_for(adapter)
    for step in range(steps):
        unet_step(pipe, adapter, optimizer, step, steps)
    return pipe, adapter, difftune.save_adapter(pipe.unet, tmp_path / name)


def test_loaded_adapter_gives_exactly_the_trained_images(tmp_path):
    pipe, adapter, path = trained_pipeline(tmp_path)
    assert adapter.stage == 1 and adapter.eligible  # progressive and low-rank both ran
    images = generate(pipe)
    base_images = generate(build("sd"))
    assert abs(images - base_images).max() > 1e-4
    fresh = build("sd")
    loaded = difftune.load_adapter(fresh, path)
    assert abs(generate(fresh) - images).max() == 0
    assert loaded.threshold == adapter.threshold
    info = difftune.read_adapter_info(path)
    assert info["extra"]["threshold"] == adapter.threshold and info["extra"]["progressive_applied"]
    difftune.set_adapter_scale(fresh, 0.0)
    assert abs(generate(fresh) - base_images).max() == 0


def test_scale_and_merging_two_adapters(tmp_path):
    _, first, path_a = trained_pipeline(tmp_path, "a", budget=0.05)
    delta_a = {k: (e.index.long(), e.delta.detach().clone()) for k, e in first.entries.items()}
    _, second, path_b = trained_pipeline(tmp_path, "b", budget=0.08, lambda_rank=0.0)
    delta_b = {k: (e.index.long(), e.delta.detach().clone()) for k, e in second.entries.items()}

    base = build("sd")
    w0 = weights(base.unet)
    difftune.load_adapter(base, path_a, scale=0.5)
    merged = weights(base.unet)
    for key, (index, delta) in delta_a.items():
        torch.testing.assert_close(merged[key].reshape(-1)[index], w0[key].reshape(-1)[index] + 0.5 * delta)
    difftune.remove_adapter(base)

    adapter = difftune.load_adapter(base, [path_a, path_b], scale=[0.6, 0.6])
    combined = weights(base.unet)
    for key in w0:
        expected = w0[key].reshape(-1).clone()
        for index, delta in (delta_a.get(key, (None, None)), delta_b.get(key, (None, None))):
            if index is not None:
                expected[index] += 0.6 * delta
        torch.testing.assert_close(combined[key].reshape(-1), expected, atol=1e-7, rtol=1e-6)
    assert adapter.threshold == second.threshold > first.threshold  # union of nested masks
    again = difftune.save_adapter(base.unet, tmp_path / "merged")
    fresh = build("sd")
    difftune.load_adapter(fresh, again)
    assert all(torch.equal(v, combined[k]) for k, v in weights(fresh.unet).items())

    lora = build("sd")
    difftune.add_adapter(lora.unet, "lora", targets="attn")
    lora_path = difftune.save_adapter(lora.unet, tmp_path / "lora")
    with pytest.raises(difftune.DifftuneError, match="'lora' cannot combine"):
        difftune.load_adapter(build("sd"), [lora_path, lora_path])


def test_other_base_weights_are_refused_and_lower_precision_is_accepted(tmp_path):
    _, adapter, path = trained_pipeline(tmp_path, steps=2)
    other = build("sd", seed=1)  # same architecture, other weights
    with pytest.raises(difftune.BaseModelMismatchError, match=r"SaRA mask of '.*' does not match"):
        difftune.load_adapter(other, path)
    assert not difftune.has_adapter(other.unet)

    half = build("sd").to(torch.bfloat16)
    w0 = weights(half.unet)
    loaded = difftune.load_adapter(half, path)
    merged = weights(half.unet)
    for key, e in adapter.entries.items():
        assert torch.equal(loaded.entries[key].index, e.index)  # the file's mask is used
        index = e.index.long()
        expected = (w0[key].reshape(-1)[index].float() + e.delta.detach()).bfloat16()
        assert torch.equal(merged[key].reshape(-1)[index], expected)


def test_a_load_computes_no_mask_and_attaches_the_deltas_once(tmp_path, monkeypatch):
    """The file holds the masks: a load checks each against |W0| < θ once and attaches once, with no
    selection from the config (formerly: a budget quantile and a mask per tensor, then overwritten)."""
    from collections import Counter

    from difftune import sparse_backprop
    from difftune.tuners.sara import files, model

    pipe, adapter, path = trained_pipeline(tmp_path, steps=2)
    inputs = denoiser_inputs(pipe)
    with torch.no_grad():
        trained = pipe.unet(**inputs).sample
    calls = Counter()

    def counted(owner, name):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.update([name]) or original(*a, **k))

    counted(model, "select_entries")
    counted(model, "threshold_for_count")
    counted(files, "mask_disagreement")
    counted(sparse_backprop.SparseBackprop, "__init__")
    counted(sparse_backprop.SparseBackprop, "detach")
    fresh = build("sd")
    loaded = difftune.load_adapter(fresh, path)
    assert calls == {"__init__": 1, "mask_disagreement": len(adapter.entries)}
    assert list(loaded.entries) == list(adapter.entries)  # the optimizer's parameter order
    with torch.no_grad():
        assert torch.equal(fresh.unet(**inputs).sample, trained)


def test_a_skipped_optimizer_step_neither_decays_nor_advances_progressive_adjustment():
    """The trainer says whether the step ran: on a skipped one (fp16 overflow) nothing moves, and the
    progressive adjustment due at it waits for the next step that runs."""
    def start():
        model = mlp()
        adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.3, lambda_rank=0.0,
                                       progressive_step=2)
        optimizer = train_mlp(model, adapter, steps=1, lr=3e-2, weight_decay=0.5, max_steps=4)
        x, y = mlp_batch(1)
        F.mse_loss(model(x), y).backward()
        return adapter, optimizer

    adapter, optimizer = start()
    before = {k: e.delta.detach().clone() for k, e in adapter.entries.items()}
    adapter.finish_optimizer_step(2, 4, optimizer, stepped=False)  # optimizer.step() was skipped
    assert adapter.stage == 0
    assert all(torch.equal(e.delta, before[k]) for k, e in adapter.entries.items())  # no decay either
    optimizer.step()
    adapter.finish_optimizer_step(3, 4, optimizer, stepped=True)
    assert adapter.stage == 1

    ran, ran_optimizer = start()  # the same step, run: decayed, and adjusted at step 2
    ran.finish_optimizer_step(2, 4, ran_optimizer, stepped=True)
    assert ran.stage == 1
    assert all(not torch.equal(e.delta, before[k]) for k, e in ran.entries.items())


def test_the_trainer_step_tells_sara_that_accelerate_skipped_the_update(monkeypatch):
    """training.loop.optimizer_step under accelerate, with its fp16-overflow skip simulated."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from difftune.training import loop

    model = mlp()
    adapter = difftune.add_adapter(model, "sara", targets=r"\d", budget=0.3, lambda_rank=0.0,
                                   progressive_step=1)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(adapter.optimizer_parameter_groups(0.5), lr=3e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    x, y = mlp_batch(0)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    before = {k: e.delta.detach().clone() for k, e in adapter.entries.items()}

    def overflow(self, closure=None):  # what the gradient scaler does on inf gradients
        self._is_overflow = True

    with monkeypatch.context() as patch:
        patch.setattr(AcceleratedOptimizer, "step", overflow)
        loop.optimizer_step(accelerator, adapter, model, optimizer, scheduler, 0, 4, 0.0, loss.item())
    assert adapter.stage == 0 and all(torch.equal(e.delta, before[k]) for k, e in adapter.entries.items())
    assert scheduler.scheduler.last_epoch == 0  # the schedule did not advance either
    optimizer._is_overflow = False  # the scaler's verdict on the next, finite step
    loss = F.mse_loss(model(x), y)
    loss.backward()
    loop.optimizer_step(accelerator, adapter, model, optimizer, scheduler, 1, 4, 0.0, loss.item())
    assert adapter.stage == 1


# --- checkpoint / resume ----------------------------------------------------------------------

def save_checkpoint(pipe, adapter, optimizer, folder):
    difftune.save_adapter(pipe.unet, folder)
    torch.save({"optimizer": optimizer.state_dict(), "adapter": adapter.training_state()},
               folder / "state.pt")


def load_checkpoint(folder):
    pipe = build("sd")
    adapter = difftune.load_adapter(pipe, folder)
    state = torch.load(folder / "state.pt", weights_only=True)
    adapter.load_training_state(state["adapter"])
    optimizer = optimizer_for(adapter)
    optimizer.load_state_dict(state["optimizer"])
    return pipe, adapter, optimizer


def test_interrupted_and_resumed_runs_end_bit_exact(tmp_path):
    """Checkpoints before and after the progressive step (3) resume to the same adapter."""
    steps, options = 5, {"budget": 0.05, "progressive_step": 3, "lambda_rank": 5e-2}
    pipe = build("sd")
    adapter = difftune.add_adapter(pipe.unet, "sara", **options)
    assert any(is_eligible(e.shape) for e in adapter.entries.values())
    optimizer = optimizer_for(adapter)
    for step in range(steps):
        if step in (2, 4):
            save_checkpoint(pipe, adapter, optimizer, tmp_path / f"checkpoint-{step}")
        unet_step(pipe, adapter, optimizer, step, steps)
    reference = difftune.save_adapter(pipe.unet, tmp_path / "reference").read_bytes()
    frozen = {k: e.frozen.clone() for k, e in adapter.entries.items()}
    del pipe, adapter, optimizer

    for interrupted in (2, 4):
        pipe, adapter, optimizer = load_checkpoint(tmp_path / f"checkpoint-{interrupted}")
        assert isinstance(adapter, SaraAdapter) and adapter.stage == (1 if interrupted > 3 else 0)
        for step in range(interrupted, steps):
            unet_step(pipe, adapter, optimizer, step, steps)
        assert difftune.save_adapter(pipe.unet, tmp_path / f"resumed-{interrupted}").read_bytes() == reference
        assert all(torch.equal(e.frozen, frozen[k]) for k, e in adapter.entries.items())


def test_readme_sara_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs/methods/sara.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if '"sara"' in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "docs/methods/sara.md", "exec"), namespace)
    assert namespace["adapter"].stage == 1  # progressive adjustment ran at step 2 of 4
    assert (tmp_path / "outputs/sara/adapter.safetensors").is_file()
    loaded = difftune.get_adapter(namespace["fresh"])
    assert all(torch.equal(loaded.entries[k].delta, e.delta) for k, e in namespace["adapter"].entries.items())
