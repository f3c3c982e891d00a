"""LoRA files of other tools, imported by difftune.load_adapter, give what the tool that wrote them gives.

Each file is written by its tool (peft through diffusers' ``save_lora_weights`` with its
``lora_adapter_metadata``, kohya's layout with per-module ``.alpha`` tensors) from a pipeline that
carries the LoRA; that pipeline's images are the reference. diffusers' own ``load_lora_weights`` on
the same file must give them too, where diffusers reads the layout correctly.
"""

import json

import pytest
import torch
from conftest import build, generate
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import difftune
from difftune.adapter_file import METADATA_KEY

TOL = 1e-5


def peft_pipeline(**config):
    """A tiny SD pipeline with a peft LoRA on its UNet (random B, so it changes the images)."""
    pipe = build("sd")
    pipe.unet.add_adapter(LoraConfig(init_lora_weights="gaussian", **config))
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return pipe


def saved_by_diffusers(pipe, folder, **config):
    """The file diffusers' save_lora_weights writes for the pipeline's peft LoRA, with its metadata."""
    layers = get_peft_model_state_dict(pipe.unet)
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config)
    return folder / "pytorch_lora_weights.safetensors"


def images_of_diffusers_load(path):
    fresh = build("sd")
    fresh.load_lora_weights(str(path))
    return generate(fresh)


def images_of_difftune_import(path):
    fresh = build("sd")
    difftune.load_adapter(fresh, path)
    return generate(fresh)


PEFT_LAYOUTS = {
    "alpha 8 at rank 4": {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    "rank and alpha patterns": {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_v"],
                                "rank_pattern": {"to_v": 2}, "alpha_pattern": {"to_v": 6}},
    "rsLoRA": {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k"], "use_rslora": True},
}


@pytest.mark.parametrize("layout", sorted(PEFT_LAYOUTS))
def test_a_peft_file_with_lora_adapter_metadata_keeps_its_alpha(layout, tmp_path):
    config = PEFT_LAYOUTS[layout]
    pipe = peft_pipeline(**config)
    expected = generate(pipe)
    assert float(abs(expected - generate(build("sd"))).max()) > 1e-2  # the LoRA does change the images
    path = saved_by_diffusers(pipe, tmp_path, **config)
    assert float(abs(images_of_diffusers_load(path) - expected).max()) < TOL
    assert float(abs(images_of_difftune_import(path) - expected).max()) < TOL


def test_a_kohya_file_scales_each_module_by_its_alpha(tmp_path):
    config = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_v"], "rank_pattern": {"to_v": 2},
              "alpha_pattern": {"to_v": 6}}
    expected = generate(peft_pipeline(**config))
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(peft_pipeline(**config).unet).items()}
    kohya = convert_state_dict_to_kohya(state)
    for key in [k for k in kohya if k.endswith(".alpha")]:  # kohya's rule: each module's own alpha/rank
        kohya[key] = torch.tensor(6.0 if "to_v" in key else 4.0)
    save_file(kohya, tmp_path / "kohya.safetensors", metadata={"ss_network_module": "networks.lora"})
    assert float(abs(images_of_difftune_import(tmp_path / "kohya.safetensors") - expected).max()) < TOL


def test_a_difftune_lora_whose_own_entry_is_gone_still_loads_at_its_alpha(tmp_path):
    """The diffusers half of the header (lora_adapter_metadata) keeps the strength."""
    pipe = build("sd")
    difftune.add_adapter(pipe, "lora", rank=4, alpha=8.0)
    with torch.no_grad():
        for param in difftune.trainable_parameters(pipe):
            param.normal_(0, 0.1)
    expected = generate(pipe)
    path = difftune.save_adapter(pipe, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != METADATA_KEY}
    assert json.loads(metadata["lora_adapter_metadata"])["unet.lora_alpha"] == 8.0
    save_file(load_file(path), tmp_path / "plain.safetensors", metadata=metadata)
    assert float(abs(images_of_diffusers_load(tmp_path / "plain.safetensors") - expected).max()) < TOL
    assert float(abs(images_of_difftune_import(tmp_path / "plain.safetensors") - expected).max()) < TOL
