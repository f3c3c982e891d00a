"""Every registered model family in every export format: written and checked end to end, or refused by
`check_export_options` (what the trainer calls before loading anything) with a message naming both.
FLUX.1's, FLUX.2's, Qwen-Image's and Z-Image's LoRA layouts are checked against ComfyUI's own key maps
(comfy/utils.py, comfy/lora.py), reproduced below."""

import contextlib

import pytest
import torch
from conftest import build, generate, randomize_adapter
from safetensors.torch import load_file
from torch import nn

import difftune
from difftune.errors import DifftuneError
from difftune.export import FORMATS, check_export_options, export_adapter
from difftune.families import FAMILIES

TOL = 1e-5
LORA = {"rank": 4, "alpha": 8.0}  # alpha ≠ rank: a file that loses alpha loads at the wrong strength
CASES = [(family, fmt) for family in FAMILIES for fmt in FORMATS]


def refusal(family: str, fmt: str) -> str | None:
    try:
        check_export_options("lora", LORA, family, fmt, None, None)
    except DifftuneError as err:
        return str(err)
    return None


def trained(tmp_path, family: str, method: str = "lora", targets: str = "attn", images: bool = True,
            **options):
    """A random adapter on the family's tiny model, saved; the images it gives (None without
    ``images``); the merged denoiser's weights; and a pipeline of the bare base model."""
    pipe = build(family)
    difftune.add_adapter(pipe, method, targets=targets, **(options or LORA))
    randomize_adapter(pipe, std=0.1)
    path = difftune.save_adapter(pipe, tmp_path / "adapter.safetensors", base_model=f"builtin:tiny-{family}")
    drawn = generate(pipe) if images else None
    merged = {k: v.clone() for k, v in difftune.merge_adapter(pipe).state_dict().items()}
    return path, drawn, merged, build(family)


def check_lora_file(family, fmt, output, images, pipe):
    """diffusers' own loader reads it as the adapter (in a layout it reads: not SD3's, which ComfyUI
    reads); so does difftune's import."""
    if FAMILIES[family].lora_layouts[fmt].diffusers_reads:
        fresh = build(family)
        fresh.load_lora_weights(str(output))
        assert float(abs(generate(fresh) - images).max()) < TOL
    difftune.load_adapter(pipe, output)
    assert float(abs(generate(pipe) - images).max()) < TOL
    difftune.remove_adapter(pipe)


def check_diff_file(family, output, merged, pipe):
    """W0 + Δ of every tensor the file names is the merged weight; nothing else changed."""
    layout = FAMILIES[family].lora_layouts[FAMILIES[family].diff_layout]
    denoiser, component = difftune.find_denoiser(pipe)
    layers = {name for name, module in denoiser.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    keys = {}
    for name in layers:  # (a layout that knows only some modules names only those)
        with contextlib.suppress(DifftuneError):
            keys[layout.key(component, name, denoiser.config)] = name
    base = denoiser.state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    written = set()
    for key, delta in load_file(output).items():
        stem, _, suffix = key.rpartition(".")
        tensor = f"{keys[stem]}.{'weight' if suffix == 'diff' else 'bias'}"
        torch.testing.assert_close(base[tensor] + delta, merged[tensor], atol=1e-6, rtol=0)
        written.add(tensor)
    assert changed and changed <= written


def check_diffusers_folder(output, images, pipe):
    from diffusers import DiffusionPipeline

    absent = {name: None for name, component in pipe.components.items() if component is None}
    loaded = DiffusionPipeline.from_pretrained(output, **absent)
    loaded.set_progress_bar_config(disable=True)
    assert float(abs(generate(loaded) - images).max()) < 1e-4


def check_single_file(output, merged, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "base")
    loaded = type(pipe).from_single_file(str(output), config=str(tmp_path / "base"), local_files_only=True)
    denoiser, component = difftune.find_denoiser(loaded)
    assert set(denoiser.state_dict()) == set(merged)
    assert all(torch.equal(value, merged[key]) for key, value in denoiser.state_dict().items()), component


@pytest.mark.parametrize(("family", "fmt"), CASES, ids=[f"{f}-{fmt}" for f, fmt in CASES])
def test_every_family_exports_in_every_format_or_refuses_it_naming_both(family, fmt, tmp_path):
    reason = refusal(family, fmt)
    if reason is not None:
        assert fmt in reason and family in reason, reason
        return
    path, images, merged, pipe = trained(tmp_path, family)
    output = tmp_path / ("out" if fmt == "diffusers" else "out.safetensors")
    report = export_adapter(path, output, fmt, pipeline=pipe, psnr_images=0)
    assert report.exact and report.family == family and not difftune.has_adapter(pipe)
    if fmt in ("kohya", "comfyui"):
        check_lora_file(family, fmt, output, images, pipe)
    elif fmt == "diff":
        check_diff_file(family, output, merged, pipe)
    elif fmt == "diffusers":
        check_diffusers_folder(output, images, pipe)
    else:
        check_single_file(output, merged, pipe, tmp_path)


def test_every_format_is_written_for_some_family():
    """The matrix above is not vacuous: each format has a family that writes it."""
    assert {fmt for family, fmt in CASES if refusal(family, fmt) is None} == set(FORMATS)


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f].trainable])
def test_the_trainer_refuses_an_export_before_loading_or_accepts_it(family, train_subject, subject_dir,
                                                                   tmp_path, monkeypatch):
    """train_subject.py --export: what `check_export_options` refuses stops the trainer before any model
    loads, with the same message; what it accepts passes every check that precedes loading."""
    import difftune.model_factory

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the export format was checked")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", must_not_load)
    check = train_subject.module.check_before_loading
    base = ["--pretrained_model_name_or_path", f"builtin:tiny-{family}", "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of sks disc", "--output_dir", tmp_path / "o", "--report_to", "none"]
    for fmt in FORMATS:
        reason = refusal(family, fmt)
        if reason is None:
            check([*map(str, base), "--export", fmt])
        else:
            with pytest.raises(DifftuneError) as caught:
                check([*map(str, base), "--export", fmt])
            assert str(caught.value) == reason


# --- FLUX.1 in ComfyUI ----------------------------------------------------------------------------

def comfyui_double_blocks(config, whole: dict[str, str]) -> dict[str, tuple[str, int, int]]:
    """The joint (double) blocks of ComfyUI's Flux table: each stream's q, k, v as slices of one fused
    ``qkv`` weight, and the ``whole`` modules (diffusers name → native name) as they are."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    table: dict[str, tuple[str, int, int]] = {}
    for i in range(config["num_layers"]):
        ours, theirs = f"transformer_blocks.{i}", f"double_blocks.{i}"
        pairs = [("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")]
        for j, (image, text) in enumerate(pairs):
            table[f"{ours}.attn.{image}"] = (f"{theirs}.img_attn.qkv", j * hidden, hidden)
            table[f"{ours}.attn.{text}"] = (f"{theirs}.txt_attn.qkv", j * hidden, hidden)
        table.update({f"{ours}.{name}": (f"{theirs}.{native}", 0, -1) for name, native in whole.items()})
    return table


def comfyui_flux_key_map(config) -> dict[str, tuple[str, int, int]]:
    """ComfyUI's Flux key map (``comfy.utils.flux_to_diffusers``, which ``comfy.lora.model_lora_keys_unet``
    maps LoRA keys through) for the weights of a diffusers FLUX.1 transformer config, reproduced: diffusers
    name → (native BFL name, row offset, rows). q, k, v (and the single blocks' MLP input) are slices of
    one fused native weight."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    table = comfyui_double_blocks(config, {
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
        "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"})
    for i in range(config["num_single_layers"]):
        ours, theirs = f"single_transformer_blocks.{i}", f"single_blocks.{i}.linear1"
        for j, name in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
            table[f"{ours}.{name}"] = (theirs, j * hidden, hidden)
        table[f"{ours}.proj_mlp"] = (theirs, 3 * hidden, 4 * hidden)
        table[f"{ours}.proj_out"] = (f"single_blocks.{i}.linear2", 0, -1)
        table[f"{ours}.norm.linear"] = (f"single_blocks.{i}.modulation.lin", 0, -1)
    return table


def native_weights(transformer, table, state=None) -> dict[str, torch.Tensor]:
    """The transformer's mapped weights (or ``state``'s) as the native (fused) checkpoint holds them."""
    state = transformer.state_dict() if state is None else state
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, (native, offset, _) in table.items():
        fused.setdefault(native, []).append((offset, state[f"{name}.weight"]))
    return {native: torch.cat([w for _, w in sorted(parts, key=lambda p: p[0])])
            for native, parts in fused.items()}


def apply_like_comfyui(native: dict[str, torch.Tensor], file: dict[str, torch.Tensor], table) -> set[str]:
    """ComfyUI's LoRA loader on a FLUX.1 model: key ``transformer.<diffusers name>`` (its "regular diffusers
    flux lora format"), peft's lora_A / lora_B, strength alpha/rank (rank = lora_A's rows), or a ``.diff``;
    the update goes into the native weight's slice. Returns the keys it used (ComfyUI warns of the rest)."""
    lora_keys = {f"transformer.{name}": target for name, target in table.items()}
    used = set()
    for key, (target, offset, rows) in lora_keys.items():
        if f"{key}.lora_A.weight" in file:
            down, up = file[f"{key}.lora_A.weight"].float(), file[f"{key}.lora_B.weight"].float()
            alpha = float(file[f"{key}.alpha"]) / down.shape[0] if f"{key}.alpha" in file else 1.0
            delta = alpha * (up @ down)
            used |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight"} | ({f"{key}.alpha"} & set(file))
        elif f"{key}.diff" in file:
            delta = file[f"{key}.diff"].float()
            used.add(f"{key}.diff")
        else:
            continue
        end = offset + (rows if rows > 0 else native[target].shape[0] - offset)
        native[target][offset:end] += delta
    return used


# --- FLUX.2, Qwen-Image and Z-Image in ComfyUI (FLUX.1's table above) --------------------------------------

def comfyui_flux2_key_map(config) -> dict[str, tuple[str, int, int]]:
    """The FLUX.2 entries of ComfyUI's Flux table (``comfy.utils.flux_to_diffusers``), reproduced: q, k, v
    of each stream are slices of one fused weight; the feed-forward's ``linear_in`` / ``linear_out`` and
    the single blocks' ``to_qkv_mlp_proj`` / ``to_out`` are whole native weights (linear1, linear2)."""
    table = comfyui_double_blocks(config, {
        "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
        "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0",
        "ff_context.linear_out": "txt_mlp.2"})
    for i in range(config["num_single_layers"]):
        table[f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"] = (f"single_blocks.{i}.linear1", 0, -1)
        table[f"single_transformer_blocks.{i}.attn.to_out"] = (f"single_blocks.{i}.linear2", 0, -1)
    return table


def comfyui_z_image_key_map(config) -> dict[str, tuple[str, int, int]]:
    """ComfyUI's Z-Image table (``comfy.utils.z_image_to_diffusers``, its Lumina 2 model), reproduced: q, k,
    v slices of ``attention.qkv``, ``to_out.0`` as ``attention.out``, the rest under their own names."""
    dim = config["dim"]
    refiners = [f"{kind}.{i}" for kind in ("context_refiner", "noise_refiner")
                for i in range(config["n_refiner_layers"])]
    blocks = [f"layers.{i}" for i in range(config["n_layers"])] + refiners
    table: dict[str, tuple[str, int, int]] = {}
    for block in blocks:
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            table[f"{block}.attention.{name}"] = (f"{block}.attention.qkv", j * dim, dim)
        table[f"{block}.attention.to_out.0"] = (f"{block}.attention.out", 0, -1)
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"):
            table[f"{block}.{name}"] = (f"{block}.{name}", 0, -1)
    basic = {"all_final_layer.2-1.linear": "final_layer.linear", "all_x_embedder.2-1": "x_embedder",
             "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
             "cap_embedder.1": "cap_embedder.1", "t_embedder.mlp.0": "t_embedder.mlp.0",
             "t_embedder.mlp.2": "t_embedder.mlp.2"}
    table.update({name: (native, 0, -1) for name, native in basic.items()})
    return table


def comfyui_identity_key_map(transformer) -> dict[str, tuple[str, int, int]]:
    """ComfyUI's Qwen-Image model keeps diffusers' names: every Linear maps to itself."""
    return {name: (name, 0, -1) for name, module in transformer.named_modules()
            if isinstance(module, nn.Linear)}


COMFYUI_TABLES = {"flux": lambda t: comfyui_flux_key_map(t.config),
                  "flux2": lambda t: comfyui_flux2_key_map(t.config), "qwen-image": comfyui_identity_key_map,
                  "z-image": lambda t: comfyui_z_image_key_map(t.config)}
COMFYUI_CASES = [("flux", "attn-ff", "comfyui", "lora", LORA), ("flux", "attn-ff", "diff", "lora", LORA),
                 ("flux", "attn-ff", "comfyui", "svfit", {}), ("flux", "attn-ff", "diff", "tlora", {}),
                 ("flux2", "attn-ff", "comfyui", "lora", LORA), ("flux2", "attn-ff", "diff", "tlora", {}),
                 ("qwen-image", "all", "comfyui", "sara", {"budget": 0.05}),
                 ("qwen-image", "all", "diff", "lora", LORA), ("z-image", "all", "comfyui", "svfit", {}),
                 ("z-image", "all", "diff", "lora", LORA)]


@pytest.mark.parametrize(("family", "targets", "fmt", "method", "options"), COMFYUI_CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in COMFYUI_CASES])
def test_files_patch_comfyuis_weights_into_the_merged_model(tmp_path, family, targets, fmt, method, options):
    """ComfyUI's own table of each family (reproduced above) takes every key of the file, and applying the
    file as its loader does gives the merged model's weights: FLUX.1's and FLUX.2's fused q/k/v and
    single-block projections, Qwen-Image's and Z-Image's every layer (``all``)."""
    path, _, merged_state, pipe = trained(tmp_path, family, method, targets, images=False, **options)
    weights = {name for name, _ in pipe.transformer.named_parameters()}
    # (ComfyUI's table also names what these tiny configs lack, e.g. adaLN of Z-Image's context refiner)
    table = {k: v for k, v in COMFYUI_TABLES[family](pipe.transformer).items() if f"{k}.weight" in weights}
    base = native_weights(pipe.transformer, table)
    merged = native_weights(pipe.transformer, table, merged_state)
    rank = {"rank": 10_000} if method != "lora" and fmt == "comfyui" else {}  # SVD at full rank: exact
    export_adapter(path, tmp_path / "out.safetensors", fmt, pipeline=pipe, psnr_images=0, **rank)
    file = load_file(tmp_path / "out.safetensors")
    native = {name: value.clone() for name, value in base.items()}
    assert apply_like_comfyui(native, file, table) == set(file), "keys ComfyUI would not load"
    if fmt == "comfyui":  # (diffusers' FLUX.2 loader refuses alpha tensors: those files fold alpha in)
        assert any(key.endswith(".alpha") for key in file) == FAMILIES[family].lora_layouts[fmt].writes_alpha
    assert any(not torch.equal(native[name], base[name]) for name in native)
    for name, value in native.items():
        torch.testing.assert_close(value, merged[name], atol=1e-5, rtol=1e-5, msg=name)
