"""Several named adapters on one model: W0 + Σ wᵢ·ΔWᵢ against a dense reference for every pair of
registered methods (in both orders), switching and removal bit for bit, merged = unmerged for any
active set, text encoders, and the set read by exports. A small model of Linear and Conv2d layers
keeps the whole matrix fast; each ΔWᵢ is what the adapter merges on its own."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import difftune
from difftune.adapter_set import AdapterSet
from difftune.tuners import METHODS

TARGETS = r"to_q|to_k|mix"
OPTIONS = {
    "lora": {"rank": 2, "alpha": 4.0},
    "sara": {"budget": 0.3},
    "svfit": {"rank": 4},
    "tlora": {"residual": "lora", "rank": 2},
    "peft": {"type": "loha", "rank": 2},
    "full_ft": {"alpha": 1.0},
}


class Small(nn.Module):
    """Two Linear layers in a row and a 3x3 convolution beside them."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(16, 16)
        self.to_k = nn.Linear(16, 16)
        self.mix = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.to_k(torch.tanh(self.to_q(x)))
        return h + self.mix(x.reshape(-1, 4, 2, 2)).reshape(x.shape)


def reference(weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
    """`Small.forward` with the given weights, computed densely in float64."""
    x = x.double()
    h = F.linear(torch.tanh(F.linear(x, weights["to_q"], biases["to_q"])), weights["to_k"], biases["to_k"])
    conv = F.conv2d(x.reshape(-1, 4, 2, 2), weights["mix"], biases["mix"], padding=1)
    return h + conv.reshape(x.shape)


def base_model() -> Small:
    torch.manual_seed(0)
    return Small()


def inputs() -> torch.Tensor:
    return torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def options(method: str) -> dict:
    if method not in OPTIONS:
        pytest.skip(f"no composition options for method '{method}'")
    return OPTIONS[method]


def attach(model: nn.Module, method: str, name: str, seed: int):
    """An adapter of ``method`` as ``name`` with its tensors moved off their start (a trained one)."""
    torch.manual_seed(seed)
    adapter = difftune.add_adapter(model, method, TARGETS, name=name, **options(method))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in adapter.named_trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.05)
    return adapter


def own_update(method: str, seed: int) -> dict[str, torch.Tensor]:
    """ΔW of one adapter alone at scale 1: what its own merge adds to each weight (float64)."""
    model = base_model()
    before = {name: module.weight.detach().double().clone() for name, module in model.named_children()}
    attach(model, method, "alone", seed)
    difftune.merge_adapter(model)
    return {name: module.weight.detach().double() - before[name] for name, module in model.named_children()}


def stacked_reference(parts: list[tuple[str, int, float]], x: torch.Tensor) -> torch.Tensor:
    model = base_model()
    weights = {name: module.weight.detach().double().clone() for name, module in model.named_children()}
    biases = {name: module.bias.detach().double() for name, module in model.named_children()}
    for method, seed, weight in parts:
        for name, update in own_update(method, seed).items():
            weights[name] += weight * update
    return reference(weights, biases, x)


PAIRS = [pytest.param(first, second, id=f"{first}+{second}")
         for first, second in itertools.product(list(OPTIONS), repeat=2)]


def test_every_registered_method_has_composition_options():
    assert set(METHODS) <= set(OPTIONS), "add the new method's options to OPTIONS"


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_two_adapters_compute_w0_plus_weighted_updates(first, second):
    x = inputs()
    model = base_model()
    with torch.no_grad():
        base_out = model(x)
    attach(model, first, "one", 11)
    attach(model, second, "two", 22)
    assert difftune.list_adapters(model) == ["one", "two"]

    difftune.set_adapters(model, ["one", "two"], [0.7, -0.4])
    with torch.no_grad():
        stacked = model(x)
    expected = stacked_reference([(first, 11, 0.7), (second, 22, -0.4)], x)
    assert torch.allclose(stacked.double(), expected, atol=2e-5, rtol=1e-4)

    # merged equals unmerged for the active set, and unmerging puts the weights back bit for bit
    weights = {name: module.weight.detach().clone() for name, module in base_model().named_children()}
    before_merge = {name: difftune.adapter_set._parameter(model, f"{name}.weight").detach().clone()
                    for name in weights}
    difftune.merge_adapter(model, unload=False)
    with torch.no_grad():
        merged = model(x)
    assert torch.allclose(merged, stacked, atol=2e-5, rtol=1e-4)
    difftune.unmerge_adapter(model)
    for name, value in before_merge.items():
        assert torch.equal(difftune.adapter_set._parameter(model, f"{name}.weight"), value)
    with torch.no_grad():
        assert torch.equal(model(x), stacked)

    # switching: one of them only, everything off (the base bit for bit), everything on again
    difftune.set_adapters(model, "two", 0.5)
    assert difftune.active_adapters(model) == ["two"]
    with torch.no_grad():
        only_two = model(x)
    assert torch.allclose(only_two.double(), stacked_reference([(second, 22, 0.5)], x), atol=2e-5, rtol=1e-4)
    difftune.disable_adapters(model)
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
    difftune.enable_adapters(model)
    difftune.set_adapter_scale(model, -0.4, name="two")
    difftune.set_adapter_scale(model, 0.7, name="one")
    with torch.no_grad():
        assert torch.allclose(model(x), stacked, atol=1e-6, rtol=1e-5)

    # deleting one leaves the other as it computes alone; deleting both leaves the base bit for bit
    difftune.delete_adapter(model, "one")
    assert difftune.list_adapters(model) == ["two"]
    alone = base_model()
    attach(alone, second, "two", 22)
    difftune.set_adapter_scale(alone, -0.4)
    with torch.no_grad():
        assert torch.allclose(model(x), alone(x), atol=1e-6, rtol=1e-5)
    difftune.delete_adapter(model, "two")
    assert not difftune.has_adapter(model)
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
    for name, module in model.named_children():
        assert type(module) is type(getattr(base_model(), name))
        assert torch.equal(module.weight, weights[name])
        assert module.weight.requires_grad


@pytest.mark.parametrize("method", list(OPTIONS))
def test_merge_and_unload_of_a_set_keeps_its_output(method):
    x = inputs()
    model = base_model()
    attach(model, method, "one", 3)
    attach(model, "lora" if method != "lora" else "svfit", "two", 4)
    difftune.set_adapters(model, ["one", "two"], [1.3, 0.6])
    with torch.no_grad():
        before = model(x)
    difftune.merge_adapter(model)  # unload
    assert not difftune.has_adapter(model)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for m in model.children())
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=2e-5, rtol=1e-4)


def test_removing_the_inner_adapter_first_keeps_the_outer_one():
    x = inputs()
    model = base_model()
    attach(model, "svfit", "inner", 5)
    attach(model, "tlora", "middle", 6)
    attach(model, "lora", "peft_slot", 7)
    attach(model, "sara", "entries", 8)
    parts = [("svfit", 5, 1.0), ("tlora", 6, 1.0), ("lora", 7, 1.0), ("sara", 8, 1.0)]
    expected = stacked_reference(parts, x)
    with torch.no_grad():
        assert torch.allclose(model(x).double(), expected, atol=2e-5, rtol=1e-4)
    difftune.delete_adapter(model, "inner")
    expected = stacked_reference(parts[1:], x)
    with torch.no_grad():
        assert torch.allclose(model(x).double(), expected, atol=2e-5, rtol=1e-4)
    difftune.remove_adapter(model)
    with torch.no_grad():
        assert torch.equal(model(x), base_model()(x))


def test_names_are_checked():
    model = base_model()
    attach(model, "lora", "default", 1)
    with pytest.raises(difftune.DifftuneError, match="already attached; .*another name"):
        difftune.add_adapter(model, "sara", TARGETS, budget=0.1)
    with pytest.raises(difftune.DifftuneError, match="no adapter named 'nope'"):
        difftune.set_adapters(model, ["default", "nope"])
    with pytest.raises(difftune.DifftuneError, match="2 names but 1 weights"):
        difftune.set_adapters(model, ["default", "default"], [1.0])
    with pytest.raises(difftune.DifftuneError, match="part of the module name 'to_q'"):
        difftune.add_adapter(model, "lora", TARGETS, name="to", rank=2)
    attach(model, "svfit", "other", 2)
    with pytest.raises(difftune.DifftuneError, match="several adapters .*default.*other|no adapter named"):
        difftune.get_adapter(model, "missing")
    assert difftune.get_adapter(model).name == "default"
    difftune.merge_adapter(model, unload=False)
    with pytest.raises(difftune.DifftuneError, match="merged: call difftune.unmerge_adapter"):
        attach(model, "tlora", "third", 3)


def test_a_new_adapter_trains_beside_the_others_unless_they_are_frozen():
    model = base_model()
    first = attach(model, "lora", "first", 1)
    second = attach(model, "sara", "second", 2)
    assert all(p.requires_grad for _, p in first.named_trainable_parameters())
    first.freeze()
    trained = {id(p) for _, p in difftune.named_trainable_parameters(model)}
    assert trained == {id(p) for _, p in second.named_trainable_parameters()}
    model(inputs()).square().sum().backward()
    assert all(p.grad is None for p in model.to_q.lora_A.parameters())
    assert all(p.grad is not None for _, p in second.named_trainable_parameters())


def test_two_sara_adapters_on_the_same_weights_add_their_deltas():
    model = base_model()
    w0 = model.to_q.weight.detach().clone()
    one = attach(model, "sara", "one", 1)
    two = attach(model, "sara", "two", 2)
    entries_one, entries_two = one.entries["to_q.weight"], two.entries["to_q.weight"]
    assert torch.equal(entries_one.index, entries_two.index)  # the same |W0| < θ
    difftune.set_adapters(model, ["one", "two"], [0.5, 2.0])
    expected = w0.clone().reshape(-1)
    expected[entries_one.index.long()] += 0.5 * entries_one.delta.detach() + 2.0 * entries_two.delta.detach()
    assert torch.allclose(model.to_q.weight.detach().reshape(-1), expected, atol=1e-6)
    # both train: each delta gets its own gradient (the weight's gradient at its entries, times its weight)
    model(inputs()).sum().backward()
    assert torch.allclose(entries_one.delta.grad * 4.0, entries_two.delta.grad, atol=1e-6)
    difftune.delete_adapter(model, "one")
    expected = w0.clone().reshape(-1)
    expected[entries_two.index.long()] += 2.0 * entries_two.delta.detach()
    assert torch.allclose(model.to_q.weight.detach().reshape(-1), expected, atol=1e-6)
    difftune.delete_adapter(model, "two")
    assert torch.equal(model.to_q.weight, w0)


def test_a_set_reads_as_one_adapter_for_exports():
    model = base_model()
    attach(model, "lora", "one", 1)
    attach(model, "lora", "two", 2)
    difftune.set_adapters(model, ["one", "two"], [0.8, -1.5])
    view = AdapterSet(model)
    x = inputs()
    with torch.no_grad():
        expected = model(x)
    factors = view.lora_factors()
    weights = {}
    for name, module in model.named_children():
        down, up, alpha = factors[name]
        update = alpha / down.shape[0] * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        weights[name] = module.weight.detach().double() + update.double().reshape(module.weight.shape)
        merged, base = view.merged_and_base_tensor(f"{name}.weight")
        assert torch.allclose(merged.double(), weights[name], atol=1e-6)
        assert torch.equal(base, module.weight)
    biases = {name: module.bias.detach().double() for name, module in model.named_children()}
    assert torch.allclose(reference(weights, biases, x), expected.double(), atol=1e-5)
    attach(model, "svfit", "three", 3)
    assert "not a LoRA" in AdapterSet(model).exact_lora_refusal()


def test_text_encoder_adapters_compose_the_same_way():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)
    encoder = CLIPTextModel(config).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    targets = r".*(q_proj|v_proj)"
    with torch.no_grad():
        base_out = encoder(ids).last_hidden_state
    reference_model = copy.deepcopy(encoder)
    updates = []
    for method, seed in (("lora", 1), ("sara", 2)):
        alone = copy.deepcopy(encoder)
        torch.manual_seed(seed)
        adapter = difftune.add_adapter(alone, method, targets, name="alone", **OPTIONS[method])
        with torch.no_grad():
            for _, param in adapter.named_trainable_parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
        before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
        difftune.merge_adapter(alone)
        updates.append({n: p.detach() - before[n] for n, p in alone.named_parameters()})
    for method, seed in (("lora", 1), ("sara", 2)):
        torch.manual_seed(seed)
        adapter = difftune.add_adapter(encoder, method, targets, name=method, **OPTIONS[method])
        with torch.no_grad():
            for _, param in adapter.named_trainable_parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    difftune.set_adapters(encoder, ["lora", "sara"], [0.6, 1.5])
    with torch.no_grad():
        for name, param in reference_model.named_parameters():
            param.add_(0.6 * updates[0][name] + 1.5 * updates[1][name])
        expected = reference_model(ids).last_hidden_state
        got = encoder(ids).last_hidden_state
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    difftune.disable_adapters(encoder)
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, base_out)
    difftune.remove_adapter(encoder)
    with torch.no_grad():
        assert torch.equal(encoder(ids).last_hidden_state, base_out)


def test_a_file_trained_on_top_of_frozen_adapters_records_them(tmp_path):
    import warnings

    x = inputs()
    source = base_model()
    attach(source, "sara", "default", 1)
    style_path = difftune.save_adapter(source, tmp_path / "style.safetensors")
    model = base_model()
    style = difftune.load_adapter(model, style_path, adapter_name="style", scale=0.8)
    style.freeze()
    attach(model, "lora", "default", 2)
    subject_path = difftune.save_adapter(model, tmp_path / "subject.safetensors")
    with torch.no_grad():
        expected = model(x)
    records = difftune.read_adapter_info(subject_path)["base_adapters"]
    assert [(r["name"], r["method"], r["weight"], r["source"]) for r in records] == [
        ("style", "sara", 0.8, str(style_path))]

    alone = base_model()
    with pytest.warns(UserWarning, match=r"trained on top of the sara adapter .*style.safetensors.* at "
                                         r"weight 0.8, which is not attached"):
        difftune.load_adapter(alone, subject_path)
    stacked = base_model()
    difftune.load_adapter(stacked, style_path, adapter_name="style", scale=0.5)
    with pytest.warns(UserWarning, match="attached as 'style' at weight 0.5"):
        difftune.load_adapter(stacked, subject_path, adapter_name="subject")
    difftune.set_adapter_scale(stacked, 0.8, name="style")
    with torch.no_grad():
        assert torch.allclose(stacked(x), expected, atol=1e-6)
    fresh = base_model()
    difftune.load_adapter(fresh, style_path, adapter_name="style", scale=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        difftune.load_adapter(fresh, subject_path)
    # a second SaRA file on the same weights loads beside the first (its masks checked against W0)
    difftune.load_adapter(fresh, style_path, adapter_name="again")
    assert difftune.list_adapters(fresh) == ["style", "default", "again"]
