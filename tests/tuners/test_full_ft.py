"""Full fine-tuning as a method: the adapted layer is the base layer with W0 + alpha·ΔW, against a dense
reference layer holding that weight."""

import pytest
import torch
from conftest import single_layer_model

import difftune
from difftune.errors import DifftuneError


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
def test_the_layer_is_the_base_layer_with_the_changed_weight(kind):
    torch.manual_seed(0)
    model, x = single_layer_model(kind, 6, 5, tokens=4, size=5)
    reference = single_layer_model(kind, 6, 5, tokens=4, size=5)[0]
    reference.load_state_dict(model.state_dict())
    base_out = model(x)
    difftune.add_adapter(model, "full_ft", targets=["0"], alpha=0.5)
    assert torch.equal(model(x), base_out)  # ΔW = 0 at attach
    (delta,) = difftune.trainable_parameters(model)
    assert delta.shape == reference[0].weight.shape
    assert difftune.count_trainable_parameters(model) == reference[0].weight.numel()
    with torch.no_grad():
        delta.copy_(torch.randn(delta.shape))
        reference[0].weight.add_(0.5 * delta)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    difftune.set_adapter_scale(model, 2.0)
    with torch.no_grad():
        reference[0].weight.add_(0.5 * delta)
    assert torch.allclose(model(x), reference(x), atol=1e-5)
    loss = model(x).square().sum()
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_merge_writes_the_change_and_remove_restores_the_base():
    torch.manual_seed(1)
    model, x = single_layer_model("linear", 8, 8, tokens=3, size=0)
    original = model[0].weight.detach().clone()
    difftune.add_adapter(model, "full_ft", targets=["0"])
    (delta,) = difftune.trainable_parameters(model)
    with torch.no_grad():
        delta.normal_()
    unmerged = model(x)
    difftune.merge_adapter(model, unload=False)
    assert torch.allclose(model[0].base_layer.weight, original + delta, atol=1e-6)
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    difftune.unmerge_adapter(model)
    difftune.remove_adapter(model)
    assert torch.equal(model[0].weight, original)
    difftune.add_adapter(model, "full_ft", targets=["0"])
    with torch.no_grad():
        difftune.trainable_parameters(model)[0].copy_(delta)
    difftune.merge_adapter(model)  # for good: plain modules holding W0 + ΔW
    assert isinstance(model[0], torch.nn.Linear) and torch.allclose(model(x), unmerged, atol=1e-5)


def test_bad_alpha_is_refused():
    model, _ = single_layer_model("linear", 4, 4, tokens=1, size=0)
    with pytest.raises(DifftuneError, match="full_ft option 'alpha' must be a positive number"):
        difftune.add_adapter(model, "full_ft", targets=["0"], alpha=0)
