"""The papers' parameter counts on the real SD 1.5 / SDXL UNet configs (meta device, no memory).

Each count is checked twice: against the number the paper prints (in millions, 3 decimals)
and against a closed form over the targeted layers' shapes.
"""

import pytest
import torch
from torch import nn

import difftune
from difftune.families.sd import SD15_UNET_CONFIG
from difftune.families.sdxl import SDXL_UNET_CONFIG
from difftune.model_factory import build_denoiser_on_meta
from difftune.params import main as params_main
from difftune.targeting import resolve_targets
from difftune.tuners.tlora.functional import factorize


@pytest.fixture(scope="module")
def unets():
    return {"sd15": build_denoiser_on_meta(SD15_UNET_CONFIG, "UNet2DConditionModel"),
            "sdxl": build_denoiser_on_meta(SDXL_UNET_CONFIG, "UNet2DConditionModel")}


def closed_form(unet, method: str, options: dict) -> int:
    total = 0
    for layer in resolve_targets(unet, "attn").values():
        assert isinstance(layer, nn.Linear)
        out, k = layer.out_features, layer.in_features
        if method == "lora":
            total += options["rank"] * (k + out) + (out if options.get("use_dora") else 0)
            continue
        big_r = options["transform_rank"]
        total += big_r ** 2 * sum(f * f for f in factorize(k))
        if options["residual"] == "lora":
            total += options["rank"] * (k + out)
        else:
            total += options["rank"] ** 2 * (sum(factorize(out)) + sum(factorize(k)))
    return total


PAPER = [
    ("sd15", "lora", {"rank": 4}, 0.797),
    ("sd15", "lora", {"rank": 4, "use_dora": True}, 0.897),
    ("sd15", "tlora", {"transform_rank": 2, "residual": "lora", "rank": 4}, 0.941),
    ("sd15", "tlora", {"transform_rank": 2, "residual": "tr", "rank": 6}, 0.400),
    ("sdxl", "lora", {"rank": 1}, 1.452),
    ("sdxl", "tlora", {"transform_rank": 1, "residual": "tr", "rank": 2}, 0.397),
]


@pytest.mark.parametrize(("model", "method", "options", "millions"), PAPER,
                         ids=[f"{m}-{meth}-{mil}" for m, meth, _, mil in PAPER])
def test_counts_match_the_papers(unets, model, method, options, millions):
    unet = unets[model]
    names = resolve_targets(unet, "attn")
    assert {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in names} == {
        "to_q", "to_k", "to_v", "to_out.0"}
    difftune.add_adapter(unet, method, targets="attn", **options)
    try:
        count = difftune.count_trainable_parameters(unet)
        assert all(p.is_meta for p in difftune.trainable_parameters(unet))
    finally:
        difftune.remove_adapter(unet)
    assert round(count / 1e6, 3) == millions
    assert count == closed_form(unet, method, options)


def test_svfit_full_rank_is_min_dimension_per_layer(unets):
    unet = unets["sd15"]
    expected = sum(min(layer.weight.shape) for layer in resolve_targets(unet, "attn").values())
    rows = difftune.parameter_table(unet, [("full", "svfit", {"rank": "full"}), ("energy", "svfit", {})])
    assert rows[0].trainable == expected
    assert rows[1].trainable is None and "needs the real weights" in rows[1].note
    assert not difftune.has_adapter(unet)


def test_parameter_table_cli_prints_a_markdown_table(capsys):
    table = params_main(["--model", "sd15-config", "--row", "tlora:transform_rank=2,residual=tr,rank=6",
                         "--row", "lora:rank=4"])
    assert table == capsys.readouterr().out.rstrip("\n") + "\n"
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 3  # header + two rows
    assert "| 128 | 400,288 | 0.400M |" in lines[1] and "0.797M" in lines[2]


def test_parameter_table_on_a_real_tiny_model_leaves_it_unchanged():
    from conftest import build

    unet = build("sd").unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    rows = difftune.parameter_table(unet, [("energy", "svfit", {}), ("full", "svfit", {"rank": "full"}),
                                           ("tlora", "tlora", {})], targets="all")
    assert [row.layers for row in rows] == [len(resolve_targets(unet, "all"))] * 3
    assert 0 < rows[0].trainable <= rows[1].trainable
    assert not difftune.has_adapter(unet)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in unet.parameters())


def test_flux_dev_table_on_the_meta_device_matches_closed_forms(capsys):
    """FLUX.1-dev's transformer (11.9B weights, none allocated): every row against its closed form."""
    from difftune.families.flux import FLUX_DEV_TRANSFORMER_CONFIG
    from difftune.params import FLUX_ROWS, parameter_table

    flux = build_denoiser_on_meta(FLUX_DEV_TRANSFORMER_CONFIG, "FluxTransformer2DModel")
    assert sum(p.numel() for p in flux.parameters()) == 11_901_408_320
    layers = resolve_targets(flux, "attn")
    assert len(layers) == 19 * 8 + 38 * 3  # joint blocks' 8 projections, single blocks' q/k/v
    weights = sum(m.weight.numel() for m in layers.values())
    rows = {row.label: row for row in parameter_table(flux, FLUX_ROWS, "attn")}
    for label, method, options in FLUX_ROWS:
        if method == "sara":
            expected = round(options["budget"] * weights)
        elif method == "svfit":
            expected = sum(min(m.weight.shape) for m in layers.values())
        else:
            expected = closed_form(flux, method, options)
        assert rows[label].trainable == expected, label
        assert rows[label].layers == len(layers)
    assert rows["LoRA r=4"].trainable == 6_537_216
    table = params_main(["--model", "flux-dev-config"])  # the Flux rows are its default
    assert "| LoRA r=16 | `lora` | rank=16 | 266 | 26,148,864 | 26.149M |" in table
    capsys.readouterr()
