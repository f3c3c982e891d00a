"""The papers' parameter counts on the real SD 1.5 / SDXL UNet configs (meta device, no memory).

Each count is checked twice: against the number the paper prints (in millions, 3 decimals)
and against a closed form over the targeted layers' shapes.
"""

from pathlib import Path

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


# --- FLUX.2, Qwen-Image, Z-Image: the presets' layers and weights in closed form from the configs ----------

def flux2_presets(c) -> dict[str, tuple[int, int]]:
    """FLUX.2 (no biases): joint blocks of 8 D² attention projections and 2·3r D² gated feed-forwards,
    single blocks of one fused D → (3 + 2r)D and one (1 + r)D → D projection; around them the time
    (and guidance) embedders, three shared modulations (6, 6, 3 D²), the embedders and the output."""
    d, r = c["num_attention_heads"] * c["attention_head_dim"], c["mlp_ratio"]
    joint, single = c["num_layers"], c["num_single_layers"]
    attn = int(8 * d * d * joint + (4 + 3 * r) * d * d * single)
    ff = int(attn + 6 * r * d * d * joint)
    embedders = 2 if c["guidance_embeds"] else 1
    top = (embedders * 2 + 3 + 4, embedders * (c["timestep_guidance_channels"] * d + d * d) + 17 * d * d
           + 2 * c["in_channels"] * d + c["joint_attention_dim"] * d)
    return {"attn": (8 * joint + 2 * single, attn), "attn-ff": (12 * joint + 2 * single, ff),
            "all": (12 * joint + 2 * single + top[0], ff + top[1])}


def qwen_image_presets(c) -> dict[str, tuple[int, int]]:
    """Qwen-Image (biases everywhere, counted apart): per block 8 attention projections, two 4x MLPs,
    two 6-way modulations; a 256-channel timestep embedder, the two input projections and the output."""
    d, blocks, patch = c["num_attention_heads"] * c["attention_head_dim"], c["num_layers"], c["patch_size"]
    out = patch * patch * c["out_channels"]
    attn, ff, mods = 8 * d * d, 16 * d * d, 12 * d * d
    top = 256 * d + d * d + c["in_channels"] * d + c["joint_attention_dim"] * d + 2 * d * d + d * out
    return {"attn": (8 * blocks, attn * blocks), "attn-ff": (12 * blocks, (attn + ff) * blocks),
            "all": (14 * blocks + 6, (attn + ff + mods) * blocks + top)}


def z_image_presets(c) -> dict[str, tuple[int, int]]:
    """Z-Image (no biases in the blocks): the main layers and both refiners have 4 D² attention and a
    SwiGLU of hidden int(8D/3); the main layers and the noise refiner a 4D modulation from a 256-wide
    time embedding; then the time MLP (256 → 1024 → 256), caption, patch and final layers."""
    d, main, refiners = c["dim"], c["n_layers"], c["n_refiner_layers"]
    blocks, hidden, patch = main + 2 * refiners, int(c["dim"] / 3 * 8), c["all_patch_size"][0] ** 2
    t = min(d, 256)
    attn, ff = 4 * d * d * blocks, 3 * d * hidden * blocks
    top = (main + refiners) * t * 4 * d + 256 * 1024 + 1024 * t + c["cap_feat_dim"] * d + 2 * patch * \
        c["in_channels"] * d + t * d
    return {"attn": (4 * blocks, attn), "attn-ff": (7 * blocks, attn + ff),
            "all": (7 * blocks + main + refiners + 6, attn + ff + top)}


REFERENCES = {"flux2-dev-config": (flux2_presets, 32_223_281_152),
              "flux2-klein-4b-config": (flux2_presets, None), "flux2-klein-9b-config": (flux2_presets, None),
              "qwen-image-config": (qwen_image_presets, None),
              "z-image-config": (z_image_presets, None)}


@pytest.fixture(scope="module")
def reference_models():
    from difftune.params import meta_models

    return {name: (config, build_denoiser_on_meta(config, class_name))
            for name, (config, class_name) in meta_models().items() if name in REFERENCES}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_presets_of_the_new_families_real_configs_match_their_closed_forms(reference_models, name):
    """Layers and weights of attn, attn-ff and all on the published configs, built on the meta device (the
    numbers of the README's targets table and docs/parameters.md)."""
    config, model = reference_models[name]
    closed_form_of, total = REFERENCES[name]
    for preset, (layers, weights) in closed_form_of(config).items():
        chosen = resolve_targets(model, preset)
        assert (len(chosen), sum(m.weight.numel() for m in chosen.values())) == (layers, weights), preset
    if total:
        assert sum(p.numel() for p in model.parameters()) == total


def row_closed_forms(model, rows) -> dict[str, int]:
    """Each (label, method, options) row's count on the attn preset, from the layers' shapes alone."""
    layers = resolve_targets(model, "attn")
    weights = sum(m.weight.numel() for m in layers.values())
    counts = {}
    for label, method, options in rows:
        if method == "sara":
            counts[label] = round(options["budget"] * weights)
        elif method == "svfit":
            counts[label] = sum(min(m.weight.shape) for m in layers.values())
        else:
            counts[label] = closed_form(model, method, options)
    return counts


def test_method_rows_attach_and_count_as_their_closed_forms(reference_models):
    """`difftune.params` attaches each row's adapter on the meta device (FLUX.2 klein 4B, the smallest)."""
    from difftune.params import FLUX_ROWS, parameter_table

    _, model = reference_models["flux2-klein-4b-config"]
    expected = row_closed_forms(model, FLUX_ROWS)
    rows = parameter_table(model, FLUX_ROWS, "attn")
    assert {row.label: row.trainable for row in rows} == expected
    assert {row.layers for row in rows} == {80} and not difftune.has_adapter(model)


def docs_table(title: str) -> tuple[list[str], dict[str, list[str]]]:
    """The markdown table under the line starting with ``title`` in docs/parameters.md: header, rows."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "parameters.md").read_text()
    lines = text[text.index(title):].splitlines()
    table = [line for line in lines[lines.index(next(ln for ln in lines if ln.startswith("|"))):]]
    table = table[:next((i for i, ln in enumerate(table) if not ln.startswith("|")), len(table))]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table]
    return cells[0], {row[0]: row[1:] for row in cells[2:]}


def test_docs_tables_of_the_new_families_are_the_closed_forms(reference_models):
    from difftune.params import FLUX_ROWS

    header, rows = docs_table("Layers and weights of each preset on the published transformers")
    names = [name for name in REFERENCES]
    assert len(header) == len(names) + 1
    for preset, cells in rows.items():
        for name, cell in zip(names, cells, strict=True):
            layers, weights = REFERENCES[name][0](reference_models[name][0])[preset.strip("`")]
            assert cell == f"{layers} / {weights / 1e9:.2f}B", (preset, name)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    for preset, cells in rows.items():  # the README's targets table quotes three of the columns
        line = next(ln for ln in readme if ln.startswith(f"| {preset} |"))
        for name, label in (("flux2-dev-config", "FLUX.2-dev"), ("qwen-image-config", "Qwen-Image"),
                            ("z-image-config", "Z-Image")):
            assert f"{label} {cells[names.index(name)]}" in line, (preset, label)
    header, rows = docs_table("Trainable parameters on the published transformers")
    for name, column in zip(names, zip(*rows.values(), strict=True), strict=True):
        counts = row_closed_forms(reference_models[name][1], FLUX_ROWS)
        assert list(column) == [f"{counts[label] / 1e6:.3f}M" for label, _, _ in FLUX_ROWS], name
    assert list(rows) == [label for label, _, _ in FLUX_ROWS]
