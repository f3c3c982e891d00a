"""difftune.export and the import of other tools' LoRA files, each checked against an independent
computation: diffusers' own loaders and converters, kohya sd-scripts' naming rule, dense ΔW."""

import itertools
import json
import math

import pytest
import torch
from conftest import build, generate, randomize_adapter
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
from diffusers.utils import convert_state_dict_to_kohya
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import difftune
from difftune.errors import AdapterFileError, DifftuneError
from difftune.export import export_adapter
from difftune.export.deltas import dense, low_rank_factors
from difftune.families import get_family
from difftune.families.ldm import UNET_PREFIX

TOL = 1e-5


def trained_file(tmp_path, family="sd", method="lora", targets=("attn", "conv"), name="adapter", **options):
    """A saved adapter with random (non-zero) weights, the images it gives, and the bare pipeline."""
    pipe = build(family)
    difftune.add_adapter(pipe, method, targets=list(targets), **options)
    randomize_adapter(pipe, std=0.1 if method != "sara" else 0.01)
    path = difftune.save_adapter(pipe, tmp_path / f"{name}.safetensors", base_model=f"builtin:tiny-{family}")
    images = generate(pipe)
    difftune.remove_adapter(pipe)
    return path, images, pipe


def stems(path):
    return {key.split(".")[0] for key in load_file(path)}


@pytest.mark.parametrize(
    ("family", "targets"), [("sd", ("attn",)), ("sd", ("attn", "conv")), ("sdxl", ("attn", "conv"))]
)
def test_kohya_lora_loads_in_diffusers_as_in_difftune(tmp_path, family, targets):
    # alpha 8 at rank 4: strength 2, which diffusers' convert_state_dict_to_kohya would halve
    path, images, pipe = trained_file(tmp_path, family, targets=targets, rank=4, alpha=8.0)
    base = generate(pipe)
    report = export_adapter(
        path, tmp_path / "kohya.safetensors", "kohya", pipeline=pipe, psnr_images=1, num_inference_steps=2
    )
    assert report.exact and report.identical_images
    assert not difftune.has_adapter(pipe)
    tensors = load_file(tmp_path / "kohya.safetensors")
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}
    conv_downs = [v for k, v in tensors.items() if k.endswith("lora_down.weight") and v.dim() == 4]
    assert bool(conv_downs) == ("conv" in targets) and any(v.shape[-1] == 3 for v in conv_downs) == (
        "conv" in targets
    )
    fresh = build(family)
    fresh.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    assert float(abs(generate(fresh) - images).max()) < TOL
    assert float(abs(images - base).max()) > 1e-2  # the adapter does change the images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_lora_with_text_encoders(tmp_path, family):
    from difftune.families.unet import CLIP_ATTENTION as TEXT_ENCODER_TARGETS

    pipe = build(family)
    difftune.add_adapter(pipe, "lora", targets=["attn"], rank=2, alpha=4.0)
    encoders = [name for name in ("text_encoder", "text_encoder_2") if hasattr(pipe, name)]
    for name in encoders:
        difftune.add_adapter(getattr(pipe, name), "lora", targets=TEXT_ENCODER_TARGETS, rank=2, alpha=1.0)
        randomize_adapter(getattr(pipe, name), std=0.3)
    randomize_adapter(pipe, std=0.1)
    path = difftune.save_adapter(pipe, tmp_path / "adapter.safetensors")
    images = generate(pipe)
    difftune.remove_adapter(pipe)
    export_adapter(path, tmp_path / "kohya.safetensors", "kohya", pipeline=pipe, psnr_images=0)
    names = stems(tmp_path / "kohya.safetensors")
    prefixes = ["lora_te"] if family == "sd" else ["lora_te1", "lora_te2"]
    assert {f"{p}_text_model_encoder_layers_0_self_attn_q_proj" for p in prefixes} <= names
    fresh = build(family)
    fresh.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    assert float(abs(generate(fresh) - images).max()) < TOL
    difftune.load_adapter(pipe, tmp_path / "kohya.safetensors")  # imported with its text-encoder parts
    assert set(difftune.adapted_text_encoders(pipe)) == set(encoders)
    assert float(abs(generate(pipe) - images).max()) < TOL


def sd_scripts_names(unet: nn.Module, prefix: str = "lora_unet") -> set[str]:
    """kohya sd-scripts' rule (networks/lora.py) on a diffusers-layout UNet: every Linear/Conv2d
    inside a Transformer2DModel, ResnetBlock2D, Downsample2D or Upsample2D is named
    prefix + "_" + "<block path>.<child path>" with dots as underscores."""
    blocks = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
    names = set()
    for name, module in unet.named_modules():
        if type(module).__name__ in blocks:
            for child_name, child in module.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)) and child_name:
                    names.add(f"{prefix}.{name}.{child_name}".replace(".", "_"))
    return names


def test_sd_kohya_names_follow_sd_scripts_and_diffusers(tmp_path):
    path, _, pipe = trained_file(tmp_path, "sd", targets=("all",), rank=2, alpha=3.0)
    export_adapter(path, tmp_path / "kohya.safetensors", "kohya", pipeline=pipe, psnr_images=0)
    exported = stems(tmp_path / "kohya.safetensors")
    rule = sd_scripts_names(pipe.unet)
    # every layer of the blocks sd-scripts adapts gets exactly its name (the rest: conv_in, time MLP)
    assert rule <= exported and all(s.startswith("lora_unet_") for s in exported - rule)
    # and the same names as diffusers' own converter, which only gets alpha wrong
    theirs = convert_state_dict_to_kohya(load_file(path))  # the file's keys: unet.<module>.lora_A.weight
    assert set(theirs) == set(load_file(tmp_path / "kohya.safetensors"))
    assert {float(v) for k, v in theirs.items() if k.endswith(".alpha")} == {2.0}


def test_sdxl_names_are_the_ldm_layout_diffusers_converts_back(tmp_path):
    path, _, pipe = trained_file(tmp_path, "sdxl", targets=("all",), rank=2)
    tensors = get_family("sdxl").single_file_state_dict(pipe)
    # ComfyUI's and A1111's SDXL rule: lora_unet_ + the checkpoint's UNet key, dots as underscores
    export_adapter(path, tmp_path / "kohya.safetensors", "kohya", pipeline=pipe, psnr_images=0)
    checkpoint_names = {"lora_unet_" + k[len(UNET_PREFIX) : -len(".weight")].replace(".", "_")
                        for k in tensors if k.startswith(UNET_PREFIX) and k.endswith(".weight")}
    assert stems(tmp_path / "kohya.safetensors") <= checkpoint_names
    unet_part = {k: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    converted = convert_ldm_unet_checkpoint(unet_part, dict(pipe.unet.config))
    original = pipe.unet.state_dict()
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)
    # the second text encoder in the OpenCLIP layout converts back too
    openclip = convert_open_clip_checkpoint(
        pipe.text_encoder_2, tensors, prefix="conditioner.embedders.1.model."
    )
    te2 = pipe.text_encoder_2.state_dict()
    assert set(openclip) == set(te2) and all(torch.equal(openclip[k], te2[k]) for k in te2)


def test_svd_full_rank_is_exact_and_error_falls_with_rank():
    gen = torch.Generator().manual_seed(0)
    for shape in [(24, 16), (8, 6, 3, 3)]:
        delta = torch.randn(*shape, generator=gen)
        full = min(shape[0], math.prod(shape[1:]))
        errors = []
        for rank in range(1, full + 1):
            factors = low_rank_factors(delta, rank=rank)
            approx = dense(factors.up, factors.down)
            true_error = float((delta - approx).norm() / delta.norm())
            assert factors.relative_error == pytest.approx(true_error, rel=1e-3, abs=1e-5)
            errors.append(true_error)
        assert errors[-1] < 1e-5 and all(b < a for a, b in itertools.pairwise(errors))
        assert torch.allclose(dense(factors.up, factors.down), delta, atol=1e-5)
        by_energy = low_rank_factors(delta, energy=0.9)
        sigma = torch.linalg.svdvals(delta.reshape(shape[0], -1).double())
        kept = (sigma[: by_energy.rank] ** 2).sum() / (sigma**2).sum()
        dropped_one = (sigma[: by_energy.rank - 1] ** 2).sum() / (sigma**2).sum()
        assert kept >= 0.9 > dropped_one


def test_svfit_exports_at_full_rank_exactly_and_reports_the_cost_of_lower_ranks(tmp_path):
    path, images, pipe = trained_file(tmp_path, "sd", "svfit", targets=("attn",))
    full = export_adapter(
        path,
        tmp_path / "full.safetensors",
        "kohya",
        pipeline=pipe,
        rank=10_000,
        psnr_images=1,
        num_inference_steps=2,
    )
    assert full.relative_error < 1e-5
    fresh = build("sd")
    fresh.load_lora_weights(str(tmp_path / "full.safetensors"))
    assert float(abs(generate(fresh) - images).max()) < 1e-4
    errors = [
        export_adapter(
            path,
            tmp_path / f"r{r}.safetensors",
            "kohya",
            pipeline=pipe,
            rank=r,
            psnr_images=1,
            num_inference_steps=2,
        )
        for r in (1, 4)
    ]
    assert errors[0].relative_error > errors[1].relative_error > full.relative_error
    assert errors[0].psnr_db < errors[1].psnr_db
    report = json.loads((tmp_path / "r1.safetensors.report.json").read_text())
    assert report["relative_error"] == pytest.approx(errors[0].relative_error)
    assert {layer["rank"] for layer in report["layers"]} == {1}
    assert (tmp_path / "r1.safetensors.compare.png").is_file()


def test_diff_export_holds_exactly_the_merged_change(tmp_path):
    path, _, pipe = trained_file(tmp_path, "sd", "sara", targets=("attn", "conv"), include_bias_norm=True)
    report = export_adapter(path, tmp_path / "diff.safetensors", "diff", pipeline=pipe)
    assert report.exact and report.size_bytes == (tmp_path / "diff.safetensors").stat().st_size
    diffs = load_file(tmp_path / "diff.safetensors")
    assert any(k.endswith(".diff_b") for k in diffs)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    difftune.load_adapter(pipe, path)
    difftune.merge_adapter(pipe)
    merged = pipe.unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    diff_key = {
        k: f"lora_unet_{k.rsplit('.', 1)[0].replace('.', '_')}.{'diff' if k.endswith('weight') else 'diff_b'}"
        for k in base
    }
    assert changed and {diff_key[k] for k in changed} <= set(diffs)
    state_key = {d: k for k, d in diff_key.items()}
    for key, value in diffs.items():
        assert torch.allclose(base[state_key[key]] + value, merged[state_key[key]], atol=1e-6)


def test_single_file_export_opens_with_from_single_file(tmp_path):
    path, _, pipe = trained_file(tmp_path, "sd", rank=4, alpha=8.0)
    pipe.save_pretrained(tmp_path / "base")
    export_adapter(path, tmp_path / "single.safetensors", "single-file", pipeline=pipe)
    loaded = type(pipe).from_single_file(
        str(tmp_path / "single.safetensors"), config=str(tmp_path / "base"), local_files_only=True
    )
    difftune.load_adapter(pipe, path)
    difftune.merge_adapter(pipe)
    for component in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert set(mine) == set(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), component


def test_diffusers_export_is_the_merged_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    path, images, pipe = trained_file(tmp_path, "sd", "tlora", targets=("attn",))
    export_adapter(path, tmp_path / "merged", "diffusers", pipeline=pipe)
    assert not difftune.has_adapter(pipe)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    loaded.set_progress_bar_config(disable=True)
    assert float(abs(generate(loaded) - images).max()) < 1e-4


@pytest.mark.parametrize(("family", "fmt"), [("sd", "kohya"), ("sd3", "comfyui")])
def test_export_then_import_gives_the_same_images(tmp_path, family, fmt):
    targets = ("attn", "conv") if family == "sd" else ("attn",)
    path, images, pipe = trained_file(tmp_path, family, targets=targets, rank=4, alpha=2.0)
    export_adapter(path, tmp_path / "out.safetensors", fmt, pipeline=pipe, psnr_images=0)
    if family == "sd3":
        assert all(
            s.startswith("lora_transformer_transformer_blocks_") for s in stems(tmp_path / "out.safetensors")
        )
    adapter = difftune.load_adapter(pipe, tmp_path / "out.safetensors")
    # SD3: diffusers reads no alpha there, so the import folds alpha/rank into the up factors
    assert adapter.config.rank == 4 and adapter.config.effective_alpha == pytest.approx(
        2.0 if family == "sd" else 4.0
    )
    assert float(abs(generate(pipe) - images).max()) < TOL
    difftune.save_adapter(pipe, tmp_path / "again.safetensors")  # now a difftune file, to train further
    difftune.remove_adapter(pipe)
    difftune.load_adapter(pipe, tmp_path / "again.safetensors")
    assert float(abs(generate(pipe) - images).max()) < TOL


def test_import_of_a_diffusers_lora_with_mixed_ranks(tmp_path):
    from peft import LoraConfig

    pipe = build("sd")
    pipe.unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4,
            target_modules=["to_q", "to_v"],
            rank_pattern={"to_v": 2},
            alpha_pattern={"to_v": 6},
            init_lora_weights="gaussian",
        )
    )
    randomize_lora = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for param in randomize_lora:
            param.normal_(0, 0.1)
    expected = generate(pipe)
    from peft import get_peft_model_state_dict

    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    # as kohya would write it, alphas per module: diffusers converts it, difftune folds the scales
    kohya = convert_state_dict_to_kohya(state)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        kohya[key] = torch.tensor(6.0 if "to_v" in key else 4.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    fresh = build("sd")
    adapter = difftune.load_adapter(fresh, tmp_path / "kohya.safetensors")
    assert adapter.config.rank == 4 and len(adapter.target_names) == len(kohya) // 3
    assert float(abs(generate(fresh) - expected).max()) < TOL


def test_import_refuses_a_file_with_an_unmapped_key(tmp_path):
    path, _, pipe = trained_file(tmp_path, "sd", targets=("attn",), rank=2)
    export_adapter(path, tmp_path / "kohya.safetensors", "kohya", pipeline=pipe, psnr_images=0)
    tensors = load_file(tmp_path / "kohya.safetensors")
    stray = "lora_unet_down_blocks_0_attentions_7_transformer_blocks_0_attn1_to_q"
    tensors.update(
        {
            f"{stray}.lora_down.weight": torch.zeros(2, 32),
            f"{stray}.lora_up.weight": torch.zeros(32, 2),
            f"{stray}.alpha": torch.tensor(2.0),
        }
    )
    save_file(tensors, tmp_path / "stray.safetensors")
    with pytest.raises(AdapterFileError, match=f"'{stray}.lora_down.weight'.*nothing was loaded"):
        difftune.load_adapter(pipe, tmp_path / "stray.safetensors")
    assert not difftune.has_adapter(pipe) and not any("lora" in n for n, _ in pipe.unet.named_parameters())
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, tmp_path / "loha.safetensors")
    with pytest.raises(AdapterFileError, match="hada_w1_a' is a LoHa weight"):
        difftune.load_adapter(pipe, tmp_path / "loha.safetensors")


def test_bad_options_are_refused_before_loading(tmp_path):
    path, _, _ = trained_file(tmp_path, "sd", "svfit", targets=("attn",))
    cases = {
        ("kohya", None): "not a LoRA: give --rank R or --energy E",
        ("single-file", 4): "--rank/--energy only apply",
        ("onnx", None): "--format 'onnx'",
    }
    for (fmt, rank), message in cases.items():
        with pytest.raises(DifftuneError, match=message):
            export_adapter(path, tmp_path / "x", fmt, rank=rank)
    dora_path, _, _ = trained_file(tmp_path, "sd", targets=("attn",), name="dora", use_dora=True)
    with pytest.raises(DifftuneError, match="DoRA adapter has no exact kohya LoRA form"):
        export_adapter(dora_path, tmp_path / "x", "kohya")
    sd3_path, _, _ = trained_file(tmp_path, "sd3", targets=("attn",), name="sd3")
    with pytest.raises(DifftuneError, match="single-file writes the original SD 1.x/SDXL"):
        export_adapter(sd3_path, tmp_path / "x", "single-file")
    with safe_open(str(path), "pt") as handle:
        assert "difftune" in handle.metadata()


def trainer_flags(subject_dir, model="builtin:tiny-sd", *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject_dir,
            "--instance_prompt", "a photo of sks disc", "--report_to", "none", "--seed", 0, *extra]


def test_trainer_writes_exports_next_to_the_adapter(train_subject, subject_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_subject(*trainer_flags(subject_dir), "--output_dir", out, "--max_train_steps", 2,
                  "--adapter", "svfit", "--learning_rate", 0.05, "--num_validation_images", 1,
                  "--validation_inference_steps", 2, "--export", "kohya", "diff", "--export_rank", 2)
    printed = capsys.readouterr().out
    assert "kohya export of a svfit adapter (sd)" in printed and "diff export of a svfit adapter" in printed
    report = json.loads((out / "adapter_kohya.safetensors.report.json").read_text())
    assert {layer["rank"] for layer in report["layers"]} == {2} and report["psnr_db"] is not None
    assert (out / "adapter_diff.safetensors").is_file()
    assert (out / "adapter_kohya.safetensors.compare.png").is_file()
    # a SaRA/SVFit/TLoRA export needs its rank, and the format must fit the family: refused before training
    with pytest.raises(DifftuneError, match="not a LoRA: give --rank R or --energy E"):
        train_subject(*trainer_flags(subject_dir), "--output_dir", tmp_path / "o", "--adapter", "svfit",
                      "--export", "kohya")
    with pytest.raises(DifftuneError, match="single-file writes the original SD 1.x/SDXL layout"):
        train_subject(*trainer_flags(subject_dir, "builtin:tiny-sd3"), "--output_dir", tmp_path / "o",
                      "--export", "single-file")
    assert not (tmp_path / "o" / "adapter.safetensors").exists()


def test_trainer_continues_from_another_tools_lora_file(train_subject, subject_dir, tmp_path):
    path, images, pipe = trained_file(tmp_path, "sd", targets=("attn", "conv"), rank=2, alpha=4.0)
    export_adapter(path, tmp_path / "kohya.safetensors", "kohya", pipeline=pipe, psnr_images=0)
    flags = [*trainer_flags(subject_dir), "--max_train_steps", 1, "--skip_final_inference",
             "--init_adapter", tmp_path / "kohya.safetensors"]
    train_subject(*flags, "--output_dir", tmp_path / "run", "--learning_rate", 1e-12,
                  "--adam_weight_decay", 0)
    info = difftune.read_adapter_info(tmp_path / "run" / "adapter.safetensors")
    assert info["method"] == "lora" and info["config"]["rank"] == 2 and info["config"]["alpha"] == 4.0
    difftune.load_adapter(pipe, tmp_path / "run" / "adapter.safetensors")
    assert float(abs(generate(pipe) - images).max()) < 1e-4  # one step at lr 1e-12 changes nothing visible
    with pytest.raises(DifftuneError, match="holds a lora adapter, but --adapter is svfit"):
        train_subject(*flags, "--output_dir", tmp_path / "o", "--adapter", "svfit")


@pytest.mark.parametrize("name", ["sd15-config", "sdxl-config"])
def test_ldm_names_of_the_real_unets_convert_back(name):
    """The full-size SD 1.5 and SDXL UNets (on the meta device: names only) map to LDM keys that
    diffusers' converter maps back to every one of their tensors."""
    from difftune import model_factory
    from difftune.families.ldm import ldm_unet_name, unet_block_prefixes
    from difftune.params import meta_models

    config, class_name = meta_models()[name]
    unet = model_factory.build_denoiser_on_meta(config, class_name)
    prefixes = unet_block_prefixes(unet.config)
    keys = list(unet.state_dict())
    ldm = {UNET_PREFIX + ldm_unet_name(k, unet.config, prefixes): torch.zeros(0) for k in keys}
    assert len(ldm) == len(keys)
    assert set(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == set(keys)
