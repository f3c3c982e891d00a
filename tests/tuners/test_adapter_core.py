"""Attach / train / merge / unmerge / remove / scale on the tiny model of every registered family.

Methods and families are parametrised through the registries (conftest's `method_cases` and `family`
fixture), so every method in difftune.METHODS is held to the same contract on every family in
difftune.families.FAMILIES; a registered method without test cases fails here.
"""

import warnings

import pytest
import torch
from conftest import (
    METHOD_CASES,
    build,
    denoise,
    denoiser_inputs,
    forward,
    method_cases,
    randomize_adapter,
    tiny_latents,
)
from torch import nn

import difftune
from difftune.api import find_denoiser
from difftune.families import FAMILIES


def base_setup(family):
    """A fresh pipeline of ``family``, its denoiser, fixed inputs and the base output on them."""
    pipe = build(family)
    model, _ = find_denoiser(pipe)
    inputs = denoiser_inputs(pipe)
    return pipe, model, inputs, denoise(pipe, inputs)


def contract_cases():
    return method_cases("contract")


@pytest.mark.parametrize(("method", "targets", "options"), contract_cases())
def test_attach_keeps_output_and_trains_only_adapter(family, method, targets, options):
    pipe, model, inputs, before = base_setup(family)
    base_names = {name for name, _ in model.named_parameters()}

    difftune.add_adapter(model, method, targets=targets, **options)
    torch.testing.assert_close(denoise(pipe, inputs), before, atol=1e-6, rtol=0)

    trainable = dict(difftune.named_trainable_parameters(model))
    assert trainable, "an adapter must have trainable parameters"
    assert all(p.requires_grad for p in trainable.values())
    randomize_adapter(model)
    out = forward(model, inputs)
    out.square().mean().backward()
    # (SD3's and Qwen-Image's last block discards its context stream, so some gradients are legitimately 0;
    # the family names the modules that feed nothing)
    dead = tuple(f"{name}." for name in FAMILIES[family].modules_without_gradient(model))
    reached = sum(int(p.grad is not None and p.grad.abs().sum() > 0) for p in trainable.values())
    assert reached > len(trainable) // 2
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None or name.startswith(dead), name
        else:
            assert param.grad is None, f"base parameter {name} received a gradient"
    # no base parameter is trainable any more
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n not in trainable and n in base_names)


@pytest.mark.parametrize(("method", "targets", "options"), contract_cases())
def test_merge_unmerge_remove_and_scale(family, method, targets, options):
    pipe, model, inputs, base_out = base_setup(family)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    module_types = {name: type(m) for name, m in model.named_modules()}

    difftune.add_adapter(model, method, targets=targets, **options)
    randomize_adapter(model)
    adapted = denoise(pipe, inputs)
    assert (adapted - base_out).abs().max() > 1e-3, "the randomised adapter must change the output"

    difftune.set_adapter_scale(model, 0.0)
    torch.testing.assert_close(denoise(pipe, inputs), base_out, atol=0, rtol=0)
    difftune.set_adapter_scale(model, 1.0)
    torch.testing.assert_close(denoise(pipe, inputs), adapted, atol=1e-6, rtol=0)

    difftune.merge_adapter(model, unload=False)
    torch.testing.assert_close(denoise(pipe, inputs), adapted, atol=2e-5, rtol=1e-4)
    difftune.unmerge_adapter(model)
    torch.testing.assert_close(denoise(pipe, inputs), adapted, atol=1e-6, rtol=0)

    difftune.remove_adapter(model)
    assert {name: type(m) for name, m in model.named_modules()} == module_types
    for key, value in model.state_dict().items():
        assert torch.equal(value, originals[key]), f"{key} changed after remove_adapter"
    assert all(p.requires_grad for p in model.parameters())
    assert not difftune.has_adapter(model)


@pytest.mark.parametrize(("method", "targets", "options"), contract_cases())
def test_merge_and_unload_gives_plain_modules(method, targets, options):
    pipe = build("sd")
    model = pipe.unet
    inputs = denoiser_inputs(pipe)
    module_types = {name: type(m) for name, m in model.named_modules()}
    difftune.add_adapter(model, method, targets=targets, **options)
    randomize_adapter(model)
    adapted = denoise(pipe, inputs)
    difftune.merge_adapter(model)
    assert not difftune.has_adapter(model)
    assert {name: type(m) for name, m in model.named_modules()} == module_types
    torch.testing.assert_close(denoise(pipe, inputs), adapted, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("method", "targets", "options"), contract_cases())
def test_scale_interpolates_the_weight_change(method, targets, options):
    """Merged at scale α, each targeted weight equals W0 + α·(W1 − W0)."""
    pipe = build("sd")
    model = pipe.unet
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = model.get_submodule(name).weight.detach().clone()
    difftune.add_adapter(model, method, targets=targets, **options)
    randomize_adapter(model)

    def merged_weight(scale: float) -> torch.Tensor:
        difftune.set_adapter_scale(model, scale)
        difftune.merge_adapter(model, unload=False)
        weight = model.get_submodule(name).weight.detach().clone()
        difftune.unmerge_adapter(model)
        return weight

    w1 = merged_weight(1.0)
    assert (w1 - w0).abs().max() > 0
    torch.testing.assert_close(merged_weight(0.5), w0 + 0.5 * (w1 - w0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged_weight(0.0), w0, atol=0, rtol=0)


def test_removed_lora_leaves_no_peft_config_behind():
    model = build("sd").unet
    difftune.add_adapter(model, "lora", targets="attn")
    difftune.remove_adapter(model)
    assert not hasattr(model, "peft_config")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns when it finds a stale config
        difftune.add_adapter(model, "lora", targets="attn")


def test_one_adapter_at_a_time():
    model = build("sd").unet
    difftune.add_adapter(model, "lora", targets="attn")
    with pytest.raises(difftune.DifftuneError, match="already attached"):
        difftune.add_adapter(model, "lora", targets="attn")


def test_bad_method_and_options_are_named():
    model = build("sd").unet
    with pytest.raises(difftune.DifftuneError, match="unknown adapter method 'lorra'.*lora"):
        difftune.add_adapter(model, "lorra")
    with pytest.raises(difftune.DifftuneError, match="unknown option.*'lora'.*rnk"):
        difftune.add_adapter(model, "lora", rnk=4)
    with pytest.raises(difftune.DifftuneError, match="'rank' must be a positive integer"):
        difftune.add_adapter(model, "lora", rank=0)
    assert not difftune.has_adapter(model)


def test_any_module_works_not_only_diffusers_models():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before = model(x)
    difftune.add_adapter(model, "lora", targets=r"\d", rank=2)
    torch.testing.assert_close(model(x), before)
    assert difftune.count_trainable_parameters(model) == 2 * (8 + 16) + 2 * (16 + 4)


def test_every_registered_method_has_test_cases():
    """A method joins the registry and these tests together: one row of conftest.METHOD_CASES,
    with every use the contract suites parametrise over."""
    uses = {"contract", "files", "fuzz", "text_encoder"}
    missing = {method: sorted(uses - {use for use, cases in METHOD_CASES.get(method, {}).items() if cases})
               for method in difftune.METHODS}
    assert not {m: u for m, u in missing.items() if u}, f"methods without test cases: {missing}"


@pytest.mark.parametrize(("method", "targets", "options"), contract_cases())
def test_training_gradients_reach_every_trainable_tensor(family, method, targets, options):
    """The family's own training step (its noise, conditioning and denoiser call) back-propagates into
    every trainable tensor of the adapter, but those of modules the family says feed nothing."""
    from difftune.families import LossOptions, TrainingBatch, training_family

    pipe = build(family)
    difftune.add_adapter(pipe, method, targets=targets, **options)
    randomize_adapter(pipe)
    fam = training_family(pipe, torch.device("cpu"), LossOptions())
    generators = [torch.Generator().manual_seed(0)]
    latents = tiny_latents(fam)
    noisy = fam.add_noise(latents, fam.sample_noise(latents, generators), generators)
    size = torch.tensor([[64, 64]])
    batch = TrainingBatch(None, fam.encode_prompts(["a sks dog"]), size, torch.zeros_like(size), None, [])
    fam.per_example_loss(fam.predict(fam.denoiser, noisy, batch), noisy).mean().backward()
    dead = tuple(f"{name}." for name in fam.modules_without_gradient(fam.denoiser))
    params = difftune.named_trainable_parameters(pipe)
    assert params
    missing = [n for n, p in params if not n.startswith(dead) and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reaches {missing[:5]}"
