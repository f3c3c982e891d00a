"""Stacked adapter files: difftune and diffusers give the same images for the same LoRA files, names
and weights; a set of files exports as one (exact LoRA factors side by side, or one ΔW per tensor)."""

import pytest
import torch
from conftest import build, generate, randomize_adapter
from safetensors.torch import load_file

import difftune
from difftune.export import export_adapter

TOL = 1e-5
WEIGHTS = [0.6, 1.3]


def saved(tmp_path, name, method, targets, seed, **options):
    pipe = build("sd")
    difftune.add_adapter(pipe, method, targets=targets, **options)
    randomize_adapter(pipe, std=0.1 if method != "sara" else 0.01, seed=seed)
    return difftune.save_adapter(pipe, tmp_path / f"{name}.safetensors", base_model="builtin:tiny-sd")


def lora_files(tmp_path):
    style = saved(tmp_path, "style", "lora", ["attn", "conv"], 1, rank=4, alpha=8.0)
    subject = saved(tmp_path, "subject", "lora", "attn", 2, rank=2)
    return style, subject


def stacked(style, subject):
    """The tiny pipeline with both files as named adapters, at `WEIGHTS`."""
    pipe = build("sd")
    difftune.load_adapter(pipe, style, adapter_name="style")
    difftune.load_adapter(pipe, subject, adapter_name="subject")
    difftune.set_adapters(pipe, ["style", "subject"], WEIGHTS)
    return pipe


def test_difftune_and_diffusers_agree_on_stacked_lora_files(tmp_path):
    style, subject = lora_files(tmp_path)
    ours = stacked(style, subject)
    theirs = build("sd")
    theirs.load_lora_weights(str(tmp_path), weight_name=style.name, adapter_name="style")
    theirs.load_lora_weights(str(tmp_path), weight_name=subject.name, adapter_name="subject")
    theirs.set_adapters(["style", "subject"], adapter_weights=WEIGHTS)
    images = generate(ours)
    assert float(abs(images - generate(theirs)).max()) < TOL
    # one of them only, and switched off: still the same as diffusers
    difftune.set_adapters(ours, "subject", 0.8)
    theirs.set_adapters(["subject"], adapter_weights=[0.8])
    assert float(abs(generate(ours) - generate(theirs)).max()) < TOL
    difftune.disable_adapters(ours)
    theirs.disable_lora()
    assert float(abs(generate(ours) - generate(theirs)).max()) < TOL
    assert float(abs(generate(ours) - generate(build("sd"))).max()) == 0.0
    assert float(abs(images - generate(build("sd"))).max()) > 1e-2  # the set does change the images


def test_a_set_of_lora_files_exports_as_one_exact_kohya_file(tmp_path):
    style, subject = lora_files(tmp_path)
    pipe = stacked(style, subject)
    images = generate(pipe)
    difftune.remove_adapter(pipe)
    report = export_adapter([style, subject], tmp_path / "set.safetensors", "kohya", weights=WEIGHTS,
                            pipeline=pipe, psnr_images=0)
    assert report.exact and report.method == "lora+lora"
    assert not difftune.has_adapter(pipe)
    fresh = build("sd")
    fresh.load_lora_weights(str(tmp_path / "set.safetensors"))
    assert float(abs(generate(fresh) - images).max()) < TOL
    # another tool's file goes in first (diffusers' loader reads it), then difftune's files beside it
    difftune.load_adapter(pipe, style, adapter_name="style")
    with pytest.raises(difftune.DifftuneError, match="holds no adapter yet: load it first"):
        difftune.load_adapter(pipe, tmp_path / "set.safetensors", adapter_name="imported")
    difftune.remove_adapter(pipe)
    difftune.load_adapter(pipe, tmp_path / "set.safetensors", adapter_name="imported")
    difftune.load_adapter(pipe, style, adapter_name="style")
    assert difftune.list_adapters(pipe) == ["imported", "style"]


def test_a_mixed_set_exports_its_summed_change_as_a_diff(tmp_path):
    lora = saved(tmp_path, "lora", "lora", "attn", 3, rank=4)
    sara = saved(tmp_path, "sara", "sara", ["attn", "conv"], 4, budget=0.05)
    pipe = build("sd")
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    report = export_adapter([lora, sara], tmp_path / "diff.safetensors", "diff", weights=[0.5, 2.0],
                            pipeline=pipe)
    assert report.exact and not difftune.has_adapter(pipe)
    difftune.load_adapter(pipe, lora, adapter_name="one", scale=0.5)
    difftune.load_adapter(pipe, sara, adapter_name="two", scale=2.0)
    difftune.merge_adapter(pipe)
    merged = pipe.unet.state_dict()
    diffs = load_file(tmp_path / "diff.safetensors")
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed
    for key in changed:
        diff = diffs[f"lora_unet_{key.rsplit('.', 1)[0].replace('.', '_')}.diff"]
        assert torch.allclose(base[key] + diff, merged[key], atol=1e-6)


def test_files_with_text_encoder_adapters_stack_by_name(tmp_path):
    paths = []
    cases = (("one", "lora", 5, {"rank": 2}), ("two", "sara", 6, {"budget": 0.05}))
    for name, method, seed, options in cases:
        pipe = build("sd")
        difftune.add_adapter(pipe, method, targets="attn", **options)
        difftune.add_adapter(pipe.text_encoder, method, targets=r".*(q_proj|v_proj)", **options)
        randomize_adapter(pipe, std=0.1 if method == "lora" else 0.01, seed=seed)
        randomize_adapter(pipe.text_encoder, std=0.1 if method == "lora" else 0.01, seed=seed)
        paths.append(difftune.save_adapter(pipe, tmp_path / f"{name}.safetensors"))
    base = generate(build("sd"))
    pipe = build("sd")
    for name, path in zip(("one", "two"), paths, strict=True):
        difftune.load_adapter(pipe, path, adapter_name=name)
    assert difftune.list_adapters(pipe.text_encoder) == ["one", "two"]
    difftune.set_adapters(pipe, ["one", "two"], [0.5, 2.0])
    images = generate(pipe)
    encoder_adapters = difftune.adapter_set.adapters_on(pipe.text_encoder).values()
    assert [adapter.effective_scale for adapter in encoder_adapters] == [0.5, 2.0]
    difftune.merge_adapter(pipe, unload=False)  # both components, merged equals unmerged
    assert float(abs(generate(pipe) - images).max()) < TOL
    difftune.unmerge_adapter(pipe)
    difftune.delete_adapter(pipe, "one")
    assert difftune.list_adapters(pipe.text_encoder) == ["two"]
    difftune.remove_adapter(pipe)
    assert not difftune.adapted_text_encoders(pipe)
    assert float(abs(generate(pipe) - base).max()) == 0.0
