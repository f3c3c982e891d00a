"""--quantize_base / --quantize_text_encoder: which pipeline components diffusers is asked to load
through bitsandbytes (the loading itself needs CUDA and bitsandbytes: not here)."""

import pytest
import torch
from conftest import build

from difftune.families import FAMILIES
from difftune.training import loop
from difftune.training.settings import ModelSettings


class RecordedQuantization:
    """Stands in for diffusers' PipelineQuantizationConfig (which needs bitsandbytes installed)."""

    def __init__(self, quant_backend, quant_kwargs, components_to_quantize):
        self.backend, self.kwargs, self.components = quant_backend, quant_kwargs, components_to_quantize


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize(("base", "text"), [("4bit", None), (None, "8bit"), ("4bit", "4bit")])
def test_quantized_components_are_the_pipelines_denoisers_and_text_encoders(monkeypatch, name, base, text):
    import diffusers

    monkeypatch.setattr(diffusers, "PipelineQuantizationConfig", RecordedQuantization)
    family = FAMILIES[name]
    model = ModelSettings(pretrained_model_name_or_path=f"builtin:tiny-{name}", quantize_base=base,
                          quantize_text_encoder=text)
    config = loop.quantization_kwargs(model, torch.bfloat16)["quantization_config"]
    pipeline = build(name)
    modules = {key: value for key, value in pipeline.components.items() if isinstance(value, torch.nn.Module)}
    denoisers = [key for key in modules if key == family.denoiser_component or key.startswith("transformer")]
    encoders = [key for key in modules if key.startswith("text_encoder")]
    # every text encoder of the pipeline (the tiny SD3 leaves out T5, which the real one has)
    assert encoders and set(encoders) <= set(family.text_encoder_components)
    expected = (denoisers if base else []) + (list(family.text_encoder_components) if text else [])
    assert sorted(config.components) == sorted(expected)
    bits = base or text
    assert config.backend == f"bitsandbytes_{bits}"
    assert config.kwargs == ({"load_in_8bit": True} if bits == "8bit" else {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16})


def test_no_quantization_flag_loads_as_is():
    assert loop.quantization_kwargs(ModelSettings(pretrained_model_name_or_path="builtin:tiny-sd"),
                                    torch.float32) == {}


@pytest.mark.parametrize("flag", ["quantize_base", "quantize_text_encoder"])
def test_a_built_in_model_is_not_quantised_even_with_bitsandbytes(monkeypatch, flag):
    import argparse
    import importlib.util

    from difftune import DifftuneError
    from difftune.training import arguments

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: object() if name == "bitsandbytes" else find_spec(name, *rest))
    args = argparse.Namespace(pretrained_model_name_or_path="builtin:tiny-flux", adapter="lora",
                              **{"quantize_base": None, "quantize_text_encoder": None, flag: "4bit"})
    with pytest.raises(DifftuneError, match=f"--{flag} loads hub or folder models through diffusers; "
                                            "builtin:tiny-flux is built in memory"):
        arguments.check_quantized_base(args)
