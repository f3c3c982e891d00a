"""Unstructured backprop (difftune.sparse_backprop), checked against dense autograd."""

import gc
import os
import socket
import weakref

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from difftune.errors import DifftuneError
from difftune.sparse_backprop import SparseBackprop, SparseEntries


class Net(nn.Module):
    """Linear, conv, norm and a weight used twice: every way a weight is read."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.fc(x)).view(-1, 4, 2, 2)
        h = self.norm(self.conv(h)).flatten(1)
        return self.out(h) + self.out(h.flip(1))  # self.out.weight is read twice


SELECTED = ("fc.weight", "conv.weight", "conv.bias", "norm.weight", "out.weight")


def make(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = Net().to(dtype)
    net.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    selection = {}
    for key in SELECTED:
        numel = net.get_parameter(key).numel()
        selection[key] = torch.randperm(numel, generator=gen)[: max(1, numel // 3)].sort().values
    return net, selection


def dense_reference(base_state, selection, deltas, x):
    """Loss and gradients with plain autograd on dense weights W0 + Δ at the selection."""
    params = {}
    for key, value in base_state.items():
        value = value.detach().clone().float()
        if key in selection:
            flat = value.reshape(-1)
            index = selection[key].long()
            value = flat.index_put((index,), flat[index] + deltas[key]).reshape(value.shape)
            value.requires_grad_(True)
        params[key] = value
    loss = torch.func.functional_call(Net(), params, (x,)).square().mean()
    loss.backward()
    return loss, {k: params[k].grad.reshape(-1)[selection[k].long()] for k in selection}


def weight(net, key):
    """The dense weight as the forward sees it (outside grad mode it is the Parameter)."""
    with torch.no_grad():
        return net.get_parameter(key).detach().clone()


def randomize(sparse, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, delta in sparse.named_parameters():
            delta.copy_(torch.randn(delta.shape, generator=gen) * 0.1)


def test_gradients_are_the_dense_gradients_at_the_selected_entries():
    net, selection = make()
    x = torch.randn(3, 12)
    before = net(x)
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    sparse = SparseBackprop(net, selection)
    torch.testing.assert_close(net(x), before, atol=0, rtol=0)
    randomize(sparse)
    loss = net(x).square().mean()
    loss.backward()
    deltas = {k: e.delta.detach() for k, e in sparse.entries.items()}
    ref_loss, ref_grads = dense_reference(base_state, selection, deltas, x)
    torch.testing.assert_close(loss, ref_loss)
    for key, entries in sparse.entries.items():
        assert entries.delta.grad.shape == (selection[key].numel(),)
        torch.testing.assert_close(entries.delta.grad, ref_grads[key])
    # no dense gradient anywhere; the deltas are model parameters
    names = dict(net.named_parameters())
    assert all(p.grad is None for n, p in names.items() if "sparse_delta" not in n)
    assert {n for n, _ in sparse.named_parameters()} == {n for n in names if "sparse_delta" in n}
    assert all(e.index.dtype == torch.int32 for e in sparse.entries.values())


def test_dense_gradients_are_freed_as_soon_as_they_are_gathered(monkeypatch):
    net, selection = make()
    sparse = SparseBackprop(net, selection, weight_gradients="dense")  # the route with dense gradients
    randomize(sparse)
    seen = []
    original = SparseEntries.gather_gradient

    def recording(self, grad):
        seen.append(weakref.ref(grad))
        return original(self, grad)

    monkeypatch.setattr(SparseEntries, "gather_gradient", recording)
    net(torch.randn(3, 12)).square().mean().backward()
    gc.collect()
    assert len(seen) >= len(SELECTED)
    assert all(ref() is None for ref in seen), "a dense weight gradient outlived the backward pass"


def test_optimizer_state_is_nnz_sized_and_training_writes_the_weights():
    net, selection = make()
    sparse = SparseBackprop(net, selection)
    w0 = {k: weight(net, k) for k in selection}
    optimizer = torch.optim.AdamW([p for _, p in sparse.named_parameters()], lr=1e-2)
    for _ in range(2):
        net(torch.randn(3, 12)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, entries in sparse.entries.items():
        state = optimizer.state[entries.delta]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (selection[key].numel(),)
        current = weight(net, key)  # reading it writes the pending values
        changed = (current != w0[key]).reshape(-1).nonzero().reshape(-1)
        assert set(changed.tolist()) <= set(selection[key].tolist())
        torch.testing.assert_close(current.reshape(-1)[selection[key].long()],
                                   w0[key].reshape(-1)[selection[key].long()] + entries.delta.detach())


def test_gradient_accumulation_adds_up():
    net, selection = make()
    sparse = SparseBackprop(net, selection)
    randomize(sparse)
    x1, x2 = torch.randn(3, 12), torch.randn(3, 12)
    grads = []
    for x in (x1, x2):
        net(x).square().mean().backward()
        grads.append({k: e.delta.grad.clone() for k, e in sparse.entries.items()})
        for e in sparse.entries.values():
            e.delta.grad = None
    net(x1).square().mean().backward()
    net(x2).square().mean().backward()
    for key, e in sparse.entries.items():
        torch.testing.assert_close(e.delta.grad, grads[0][key] + grads[1][key])


def test_clip_grad_norm_on_model_parameters_sees_and_clips_the_values():
    net, selection = make()
    sparse = SparseBackprop(net, selection)
    randomize(sparse)
    net(torch.randn(3, 12)).square().mean().backward()
    grads = [e.delta.grad.clone() for e in sparse.entries.values()]
    expected = torch.linalg.vector_norm(torch.cat(grads))
    total = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=expected.item() / 4)
    torch.testing.assert_close(total, expected)
    for grad, e in zip(grads, sparse.entries.values(), strict=True):
        torch.testing.assert_close(e.delta.grad, grad / 4, rtol=1e-4, atol=1e-7)


def test_low_precision_base_with_float32_values():
    net, selection = make(dtype=torch.bfloat16)
    sparse = SparseBackprop(net, selection)
    for e in sparse.entries.values():
        assert e.delta.dtype == torch.float32 and e.base.dtype == torch.bfloat16
    randomize(sparse)
    net(torch.randn(3, 12, dtype=torch.bfloat16)).float().square().mean().backward()
    key = "fc.weight"
    e = sparse.entries[key]
    assert e.delta.grad.dtype == torch.float32 and e.delta.grad.abs().sum() > 0
    written = net.fc.weight.detach().reshape(-1)[selection[key].long()]
    assert torch.equal(written, (e.base.float() + e.delta.detach()).bfloat16())


def test_frozen_entries_get_no_gradient():
    net, selection = make()
    sparse = SparseBackprop(net, selection)
    e = sparse.entries["fc.weight"]
    frozen = torch.zeros(e.numel, dtype=torch.bool)
    frozen[::2] = True
    e.set_frozen(frozen)
    net(torch.randn(3, 12)).square().mean().backward()
    assert e.delta.grad[frozen].abs().sum() == 0 and e.delta.grad[~frozen].abs().sum() > 0
    with pytest.raises(DifftuneError, match="bool of shape"):
        e.set_frozen(frozen[:-1])


def test_checkpointing_channels_last_and_scale():
    net, selection = make()
    sparse = SparseBackprop(net, selection)
    randomize(sparse)
    x = torch.randn(3, 12)
    net(x).square().mean().backward()
    expected = {k: e.delta.grad.clone() for k, e in sparse.entries.items()}
    for e in sparse.entries.values():
        e.delta.grad = None
    net.conv.to(memory_format=torch.channels_last)
    assert not net.conv.weight.is_contiguous()
    torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False).square().mean().backward()
    for key, e in sparse.entries.items():
        torch.testing.assert_close(e.delta.grad, expected[key])
    w0 = sparse.entries["conv.weight"].base
    sparse.set_scale(0.5)
    index = sparse.entries["conv.weight"].index.long()
    torch.testing.assert_close(net.conv.weight.detach().reshape(-1)[index],
                               w0 + 0.5 * sparse.entries["conv.weight"].delta.detach())


def test_detach_restores_exactly_or_keeps_the_trained_weights():
    net, selection = make()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    classes = {n: type(m) for n, m in net.named_modules()}
    sparse = SparseBackprop(net, selection)
    assert type(net.fc) is not nn.Linear and isinstance(net.fc, nn.Linear)
    randomize(sparse)
    net(torch.randn(2, 12))
    sparse.detach(restore_base=True)
    assert {n: type(m) for n, m in net.named_modules()} == classes
    assert net.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())

    sparse = SparseBackprop(net, selection)
    randomize(sparse)
    trained = {k: weight(net, k) for k in selection}
    sparse.detach(restore_base=False)
    assert all(torch.equal(weight(net, k), trained[k]) for k in selection)
    assert type(net.fc) is nn.Linear


def test_bad_selection_is_named():
    net, _ = make()
    with pytest.raises(DifftuneError, match="no parameter 'fc.weigth'"):
        SparseBackprop(net, {"fc.weigth": torch.tensor([0])})
    assert type(net.fc) is nn.Linear


def test_torch_compile_trains_like_eager_or_names_the_limit():
    def run(backend, **kwargs):
        net, selection = make()
        sparse = SparseBackprop(net, selection)
        model = torch.compile(net, backend=backend, **kwargs) if backend else net
        optimizer = torch.optim.AdamW([p for _, p in sparse.named_parameters()], lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            model(torch.randn(3, 12, generator=gen)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return [e.delta.detach().clone() for e in sparse.entries.values()]

    reference = run(None)
    compiled = run("aot_eager")
    assert all(torch.equal(a, b) for a, b in zip(reference, compiled, strict=True))
    with pytest.raises(Exception, match="outside the compiled graph"):
        run("eager", fullgraph=True)


# --- DDP through accelerate: two CPU processes (gloo) -----------------------------------

def _ddp_worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    net, selection = make()
    sparse = SparseBackprop(net, selection)
    randomize(sparse)
    model = accelerator.prepare(net)
    reduced = [p.numel() for p in model.parameters() if p.requires_grad]  # what DDP all-reduces
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(10 + rank))
    accelerator.backward(model(x).square().mean())
    results[rank] = {
        "grads": {k: e.delta.grad.clone() for k, e in sparse.entries.items()},
        "dense_grads": [n for n, p in net.named_parameters() if "sparse" not in n and p.grad is not None],
        "trainable_sizes": sorted(reduced),
        "distributed": str(accelerator.distributed_type),
    }
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_accelerate_ddp_all_reduces_only_the_1d_gradients():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    net, selection = make()
    sparse = SparseBackprop(net, selection)
    randomize(sparse)
    local = []
    for rank in range(2):
        for e in sparse.entries.values():
            e.delta.grad = None
        x = torch.randn(3, 12, generator=torch.Generator().manual_seed(10 + rank))
        net(x).square().mean().backward()
        local.append({k: e.delta.grad.clone() for k, e in sparse.entries.items()})
    for rank in range(2):
        got = results[rank]
        assert "MULTI_CPU" in got["distributed"]
        assert got["dense_grads"] == []
        assert got["trainable_sizes"] == sorted(s.numel() for s in selection.values())
        for key in selection:
            torch.testing.assert_close(got["grads"][key], (local[0][key] + local[1][key]) / 2)
