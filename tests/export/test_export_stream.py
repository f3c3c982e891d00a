"""Streamed exports: each changed tensor merged on its own equals the whole-model merge; the writer
holds one made tensor at a time; a diff leaves out (and names) what ComfyUI has no key for."""

import re
import weakref

import pytest
import torch
from conftest import build, randomize_adapter
from safetensors.torch import load_file

import difftune
from difftune.adapter_file import LazyTensor, write_safetensors
from difftune.export import export_adapter
from difftune.export.deltas import changed_tensors, merged_and_base
from difftune.families import get_family
from difftune.families.unet import CLIP_ATTENTION as TEXT_ENCODER_TARGETS

OPTIONS = {"lora": {"rank": 2, "alpha": 3.0}, "sara": {"budget": 0.05, "include_bias_norm": True},
           "svfit": {"rank": 2}, "tlora": {}}


def adapted(method, family="sd", seed=1):
    pipe = build(family)
    difftune.add_adapter(pipe, method, targets=["attn", "conv"] if method != "tlora" else "attn",
                         **OPTIONS.get(method, {}))
    randomize_adapter(pipe, std=0.01 if method == "sara" else 0.1, seed=seed)
    return pipe


@pytest.mark.parametrize("method", sorted(difftune.METHODS))
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_each_tensor_merged_on_its_own_equals_the_whole_merge(method, scale, tmp_path):
    pipe = adapted(method)
    difftune.set_adapter_scale(pipe, scale)
    path = difftune.save_adapter(pipe, tmp_path / "a.safetensors")
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    streamed = {part: {name: tuple(t.clone() for t in pair()) for name, pair in pairs.items()}
                for part, pairs in changed_tensors(pipe).items()}
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())  # left as it was
    difftune.remove_adapter(pipe)
    difftune.load_adapter(pipe, path, scale=scale)
    whole = merged_and_base(pipe)  # merge everything, read, remove
    assert streamed.keys() == whole.keys() and streamed["unet"].keys() == whole["unet"].keys()
    for name, (merged, base) in whole["unet"].items():
        assert torch.equal(streamed["unet"][name][0], merged), name
        assert torch.equal(streamed["unet"][name][1], base), name


def test_the_writer_holds_one_made_tensor_at_a_time(tmp_path):
    pipe = adapted("lora")
    family = get_family("sd")
    entries = family.single_file_entries(pipe, family.single_file_states(pipe))
    alive: list[weakref.ref] = []

    def watched(make):
        def make_one():  # CPython frees a tensor when its last reference goes: no gc pass needed
            assert sum(ref() is not None for ref in alive) == 0, "an earlier tensor is still held"
            tensor = make().clone()  # a fresh tensor, as a merged weight is
            alive.append(weakref.ref(tensor))
            return tensor
        return make_one

    watched_entries = {name: LazyTensor(e.shape, e.dtype, watched(e.make)) for name, e in entries.items()}
    write_safetensors(tmp_path / "model.safetensors", watched_entries, {"format": "pt"})
    assert len(alive) == len(entries)
    written = load_file(tmp_path / "model.safetensors")
    expected = get_family("sd").single_file_state_dict(pipe)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.parametrize("method", ["lora", "sara"])
def test_a_streamed_single_file_holds_the_merged_model(method, tmp_path):
    pipe = adapted(method)
    path = difftune.save_adapter(pipe, tmp_path / "a.safetensors", base_model="builtin:tiny-sd")
    difftune.merge_adapter(pipe)
    expected = get_family("sd").single_file_state_dict(pipe)
    bare = build("sd")
    report = export_adapter(path, tmp_path / "merged.safetensors", "single-file", pipeline=bare)
    assert report.exact and not difftune.has_adapter(bare)
    written = load_file(tmp_path / "merged.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    untouched = build("sd").unet.state_dict()
    assert all(torch.equal(v, untouched[k]) for k, v in bare.unet.state_dict().items())  # left at its base


# ComfyUI's CLIP LoRA keys, as its comfy/lora.py (model_lora_keys_clip) builds them: the six projections of
# layers 0-31 under lora_te_ (SD 1.x) or lora_te1_ / lora_te2_ (SDXL); text_projection under lora_te1/2
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}


def comfyui_clip_keys(prefixes):
    keys = {f"{p}_text_model_encoder_layers_{b}_{c}" for p in prefixes for b in range(32)
            for c in COMFY_CLIP_MAP.values()}
    return keys | {f"{p}_text_projection" for p in prefixes if p != "lora_te"}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_diff_leaves_out_and_names_the_text_encoder_tensors_comfyui_has_no_key_for(family, tmp_path):
    pipe = build(family)
    difftune.add_adapter(pipe, "sara", targets="attn", budget=0.05, include_bias_norm=True)
    encoders = [name for name in ("text_encoder", "text_encoder_2") if hasattr(pipe, name)]
    for name in encoders:
        difftune.add_adapter(getattr(pipe, name), "sara", targets=TEXT_ENCODER_TARGETS, budget=0.2,
                             include_bias_norm=True)
    randomize_adapter(pipe, std=0.01)
    for name in encoders:
        randomize_adapter(getattr(pipe, name), std=0.01)
    changed = {name: difftune.get_adapter(getattr(pipe, name)).changed_tensor_names() for name in encoders}
    path = difftune.save_adapter(pipe, tmp_path / "a.safetensors", base_model=f"builtin:tiny-{family}")
    difftune.remove_adapter(pipe)
    report = export_adapter(path, tmp_path / "diff.safetensors", "diff", pipeline=pipe)
    prefixes = ["lora_te"] if family == "sd" else ["lora_te1", "lora_te2"]
    comfy = comfyui_clip_keys(prefixes)
    stems = {key.rsplit(".", 1)[0] for key in load_file(tmp_path / "diff.safetensors")}
    text_stems = {s for s in stems if s.startswith("lora_te")}
    assert text_stems and text_stems <= comfy  # everything written has its key in ComfyUI
    norms = {f"{n}.{t}" for n in encoders for t in changed[n] if "norm" in t}
    assert norms and set(report.not_in_comfyui) == norms  # the norms, by name, and nothing else
    assert not report.exact and 0 < report.relative_error < 1
    summary = report.summary()
    assert f"{len(norms)} changed text-encoder tensors have no key in ComfyUI's loader" in summary
    assert re.search(r"layer_norm1\.(weight|bias)", summary)
    assert any(s.startswith("lora_unet_") for s in stems)
