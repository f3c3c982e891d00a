"""Target presets and regular expressions on the three layouts."""

import pytest
from conftest import build
from torch import nn

import difftune
from difftune.api import find_denoiser
from difftune.targeting import resolve_targets


def test_attn_preset_on_unet_takes_the_four_projections():
    unet = build("sd").unet
    attentions = [n for n, m in unet.named_modules() if type(m).__name__ == "Attention"]
    expected = {f"{a}.{p}" for a in attentions for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert len(attentions) > 0
    assert set(resolve_targets(unet, "attn")) == expected


def test_attn_preset_on_sd3_includes_joint_attention_extras():
    transformer = build("sd3").transformer
    names = set(resolve_targets(transformer, "attn"))
    assert "transformer_blocks.0.attn.add_q_proj" in names
    assert "transformer_blocks.0.attn.to_add_out" in names
    assert "transformer_blocks.0.attn.to_out.0" in names
    assert not any("ff" in n for n in names)


def test_attn_ff_adds_feed_forward_only():
    transformer = build("sd3").transformer
    attn = set(resolve_targets(transformer, "attn"))
    attn_ff = set(resolve_targets(transformer, "attn-ff"))
    assert attn < attn_ff
    assert all(".ff.net." in n or ".ff_context.net." in n for n in attn_ff - attn)
    assert "transformer_blocks.0.ff_context.net.2" in attn_ff


def test_conv_preset_takes_resnet_convs_and_1x1_projections():
    unet = build("sd").unet
    names = resolve_targets(unet, "conv")
    assert all(isinstance(m, nn.Conv2d) for m in names.values())
    kernels = {m.kernel_size for m in names.values()}
    assert kernels == {(1, 1), (3, 3)}
    assert any(n.endswith("proj_in") for n in names)
    assert any(n.endswith("conv_shortcut") for n in names)
    assert not any("downsamplers" in n or n == "conv_in" for n in names)


def test_all_is_every_linear_and_conv():
    unet = build("sd").unet
    expected = {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(resolve_targets(unet, "all")) == expected


def test_regex_and_lists_are_unions():
    unet = build("sd").unet
    names = resolve_targets(unet, [r".*attn2\.to_k", "conv"])
    assert any(n.endswith("attn2.to_k") for n in names)
    assert not any(n.endswith("attn1.to_k") for n in names)
    assert any(n.endswith("conv1") for n in names)


def test_containers_never_match():
    unet = build("sd").unet
    names = resolve_targets(unet, r".*attn1.*")
    assert names and all(isinstance(m, nn.Linear) for m in names.values())


def test_pattern_matching_nothing_is_named():
    unet = build("sd").unet
    with pytest.raises(difftune.TargetError, match=r"'.*nonexistent' matched no layer"):
        resolve_targets(unet, ".*nonexistent")
    with pytest.raises(difftune.TargetError, match="neither a preset"):
        resolve_targets(unet, "to_q[")


def test_unsupported_layer_types_are_named_at_attach():
    model, _ = find_denoiser(build("sd"))
    with pytest.raises(difftune.TargetError, match=r"lora supports .* cannot adapt: .*norm1 \(LayerNorm\)"):
        difftune.add_adapter(model, "lora", targets=r".*transformer_blocks\.0\.norm1")
    assert not difftune.has_adapter(model)
