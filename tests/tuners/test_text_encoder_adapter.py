"""Text-encoder adapters (--train_text_encoder): one file with the denoiser's, loaded by
difftune and, for LoRA, by diffusers' load_lora_weights; scale, merge and remove cover both."""

import pytest
import torch
from conftest import build, generate, method_cases, randomize_adapter
from safetensors import safe_open

import difftune
from difftune.families.unet import CLIP_ATTENTION as TEXT_ENCODER_TARGETS

METHODS = {param.values[0]: param.values[2] for param in method_cases("text_encoder")}


def adapted(family: str, method: str, options: dict, seed: int = 1):
    """A tiny pipeline with random adapters on the denoiser and on every CLIP text encoder."""
    pipe = build(family)
    encoders = {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")
                if getattr(pipe, name, None) is not None}
    difftune.add_adapter(pipe.unet, method, targets="attn", **options)
    randomize_adapter(pipe.unet, seed=seed)
    for index, encoder in enumerate(encoders.values()):
        difftune.add_adapter(encoder, method, targets=TEXT_ENCODER_TARGETS, **options)
        randomize_adapter(encoder, seed=seed + 10 + index)
    return pipe, encoders


@pytest.mark.parametrize(("method", "_", "options"), method_cases("text_encoder"))
def test_text_encoder_adapter_round_trips_through_one_file(method, _, options, tmp_path):
    pipe, _ = adapted("sd", method, options)
    images = generate(pipe)
    path = difftune.save_adapter(pipe, tmp_path / "run")
    info = difftune.read_adapter_info(path)
    assert set(info["text_encoders"]) == {"text_encoder"} and info["component"] == "unet"
    section = info["text_encoders"]["text_encoder"]
    assert section["method"] == method and all("self_attn" in name for name in section["targets"])
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)

    fresh = build("sd")
    difftune.load_adapter(fresh, path)
    assert difftune.has_adapter(fresh.text_encoder)
    assert abs(generate(fresh) - images).max() < 1e-5
    scale_zero = build("sd")
    difftune.load_adapter(scale_zero, path, scale=0.0)
    assert abs(generate(scale_zero) - generate(build("sd"))).max() < 1e-5
    # remove restores both components exactly
    difftune.remove_adapter(fresh)
    assert not difftune.has_adapter(fresh.text_encoder)
    assert abs(generate(fresh) - generate(build("sd"))).max() == 0


def test_text_encoder_part_changes_the_images(tmp_path):
    pipe, encoders = adapted("sd", "lora", METHODS["lora"])
    with_encoder = generate(pipe)
    difftune.set_adapter_scale(encoders["text_encoder"], 0.0)
    assert abs(generate(pipe) - with_encoder).max() > 1e-3


def test_merge_covers_the_text_encoder(tmp_path):
    pipe, _ = adapted("sd", "lora", METHODS["lora"])
    images = generate(pipe)
    difftune.merge_adapter(pipe)
    assert not difftune.has_adapter(pipe.text_encoder) and not difftune.has_adapter(pipe.unet)
    assert not any("lora" in name for name, _ in pipe.text_encoder.named_parameters())
    assert abs(generate(pipe) - images).max() < 1e-5


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_file_with_text_encoders_loads_with_diffusers(family, tmp_path):
    pipe, encoders = adapted(family, "lora", METHODS["lora"])
    images = generate(pipe)
    path = difftune.save_adapter(pipe, tmp_path / "run")
    assert set(difftune.read_adapter_info(path)["text_encoders"]) == set(encoders)
    fresh = build(family)
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    assert abs(generate(fresh) - images).max() < 1e-5


def test_file_with_a_text_encoder_part_needs_the_pipeline(tmp_path):
    pipe, _ = adapted("sd", "lora", METHODS["lora"])
    path = difftune.save_adapter(pipe, tmp_path / "run")
    bare = build("sd").unet
    with pytest.raises(difftune.DifftuneError, match=r"adapter\.safetensors: the adapter also adapts the "
                                                      r"text_encoder; load it into a pipeline"):
        difftune.load_adapter(bare, path)
    assert not difftune.has_adapter(bare)
    with pytest.raises(difftune.DifftuneError, match="text-encoder adapters cannot be combined"):
        difftune.load_adapter(build("sd"), [path, path])


def test_a_failing_text_encoder_part_leaves_the_pipeline_untouched(tmp_path):
    pipe, _ = adapted("sd", "lora", METHODS["lora"])
    path = difftune.save_adapter(pipe, tmp_path / "run")
    other = build("sd")
    # A text encoder of another width: its fingerprint does not match, nothing is attached.
    other.text_encoder = build("sdxl").text_encoder_2
    with pytest.raises(difftune.BaseModelMismatchError, match=r"\(text_encoder\)"):
        difftune.load_adapter(other, path)
    assert not difftune.has_adapter(other.unet) and not difftune.has_adapter(other.text_encoder)
    assert torch.equal(other.unet.conv_in.weight, build("sd").unet.conv_in.weight)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda s: s.pop("targets"), "text_encoders.text_encoder.targets' is missing"),
    (lambda s: s.__setitem__("fingerprint", []), "text_encoders.text_encoder.fingerprint' must be an object"),
    (lambda s: s["config"].__setitem__("rank", "four"), "text_encoders.text_encoder.method"),
])
def test_a_damaged_text_encoder_section_is_refused_naming_the_field(tmp_path, edit, field):
    import json

    from safetensors.torch import load_file, save_file

    pipe, _ = adapted("sd", "lora", METHODS["lora"])
    path = difftune.save_adapter(pipe, tmp_path / "run")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    info = json.loads(metadata["difftune"])
    info.pop("sha256")  # an older file without a checksum: the schema check alone must catch it
    edit(info["text_encoders"]["text_encoder"])
    save_file(load_file(path), str(path), metadata={**metadata, "difftune": json.dumps(info)})
    fresh = build("sd")
    with pytest.raises(difftune.AdapterFileError, match=field):
        difftune.load_adapter(fresh, path)
    assert not difftune.has_adapter(fresh.unet) and not difftune.has_adapter(fresh.text_encoder)
