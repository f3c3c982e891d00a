# ruff: noqa: RUF012 (family classes are declarations, as in difftune/families/)
"""The two registries check what they are given (as peft's register_peft_method does): a duplicate
name, an incomplete class or a claim on another's pipeline is refused; a complete family is one class
that every part of difftune then knows."""

import dataclasses

import pytest
import torch
from torch import nn

import difftune
import difftune.families as families
from difftune.errors import DifftuneError
from difftune.families import FAMILIES, register_family
from difftune.families.sd3 import SD3Family
from difftune.tuners import METHODS, Adapter, AdapterConfig, register_method
from difftune.tuners.lora import LoraAdapter, LoraConfig


@pytest.fixture
def fresh_registries(monkeypatch):
    """Registries to register into, that the test leaves as they were."""
    monkeypatch.setattr(families, "FAMILIES", dict(FAMILIES))
    before = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(before)


def test_register_method_refuses_a_taken_name_and_incomplete_classes(fresh_registries):
    with pytest.raises(DifftuneError, match="a method named 'lora' is registered already"):
        register_method(LoraAdapter)

    class Incomplete(Adapter):
        method = "incomplete"

    with pytest.raises(DifftuneError, match="does not implement .*attach"):
        register_method(Incomplete)
    with pytest.raises(DifftuneError, match="not a subclass"):
        register_method(nn.Linear)

    class Nameless(LoraAdapter):
        method = "has space"

    with pytest.raises(DifftuneError, match="'method' must be a name"):
        register_method(Nameless)

    class NotAConfig(LoraAdapter):
        method = "lora_no_config"
        config_class = dict

    with pytest.raises(DifftuneError, match="AdapterConfig dataclass"):
        register_method(NotAConfig)
    assert "incomplete" not in METHODS and "lora_no_config" not in METHODS


def test_a_registered_method_is_available_by_name(fresh_registries):
    @dataclasses.dataclass
    class ScaledConfig(LoraConfig):
        pass

    class Lora2(LoraAdapter):
        method = "lora2"
        config_class = ScaledConfig

    assert register_method(Lora2) is Lora2
    model = nn.Sequential(nn.Linear(4, 4))
    adapter = difftune.add_adapter(model, "lora2", targets="0", rank=2)
    assert isinstance(adapter, Lora2) and difftune.count_trainable_parameters(model) == 16
    assert issubclass(ScaledConfig, AdapterConfig)


def test_register_family_refuses_a_taken_name_a_claimed_pipeline_and_incomplete_classes(fresh_registries):
    with pytest.raises(DifftuneError, match="a family named 'sd3' is registered already"):
        register_family(SD3Family)

    class Claims(SD3Family):
        name = "claims"
        target_terms = {}

    with pytest.raises(DifftuneError, match="StableDiffusion3Pipeline belongs to the 'sd3' family"):
        register_family(Claims)

    class NoTitle(SD3Family):
        name, title, pipeline_classes, target_terms = "untitled", None, ("SomePipeline",), {}

    with pytest.raises(DifftuneError, match="'title' must be a str"):
        register_family(NoTitle)

    class BadFormat(SD3Family):
        name, pipeline_classes, target_terms = "badformat", ("OtherPipeline",), {}
        export_refusals = {"onnx": "no"}

    with pytest.raises(DifftuneError, match="unknown export format 'onnx'"):
        register_family(BadFormat)

    class BadPreset(SD3Family):
        name, pipeline_classes = "badpreset", ("ThirdPipeline",)
        target_terms = {"mlp": (("fc", "fc"),)}

    with pytest.raises(DifftuneError, match="unknown presets \\['mlp'\\]"):
        register_family(BadPreset)
    with pytest.raises(DifftuneError, match="not a subclass"):
        register_family(nn.Linear)


def test_a_new_family_is_one_class(fresh_registries):
    """A family declared by subclassing (here SD3's layout under another pipeline class) is detected,
    built offline as builtin:tiny-<name>, described before loading and trained by its own rules."""
    from difftune.families import LossOptions, family_of, training_family
    from difftune.model_factory import describe_model, load_pipeline

    class SD3PAGFamily(SD3Family):
        name = "sd3-pag"
        title = "SD3 with PAG"
        pipeline_classes = ("StableDiffusion3PAGPipeline",)
        target_terms = {}  # SD3's are registered already

    register_family(SD3PAGFamily)
    pipe = load_pipeline("builtin:tiny-sd3-pag")
    assert type(pipe).__name__ == "StableDiffusion3PAGPipeline" and family_of(pipe) is SD3PAGFamily
    assert describe_model("builtin:tiny-sd3-pag").family == "sd3-pag"
    family = training_family(pipe, torch.device("cpu"), LossOptions())
    latents = torch.randn(1, 4, 32, 32)
    noisy = family.add_noise(latents, torch.randn_like(latents), [torch.Generator().manual_seed(0)])
    assert noisy.sigmas is not None  # flow matching, as the family it derives from
    difftune.add_adapter(pipe, "lora", targets="attn", rank=2)
    assert difftune.get_adapter(pipe).target_names


@pytest.mark.parametrize(("class_name", "family", "task"), [
    ("StableDiffusionInpaintPipeline", "SD 1.x/2.x", "inpainting"),
    ("StableDiffusionXLImg2ImgPipeline", "SDXL", "image to image"),
    ("StableDiffusion3ControlNetPipeline", "SD3", "control images"),
    ("FluxKontextPipeline", "Flux", "image editing"),
    ("FluxFillPipeline", "Flux", "inpainting and outpainting"),
    ("Flux2KleinInpaintPipeline", "FLUX.2 klein", "inpainting"),
    ("QwenImageEditPipeline", "Qwen-Image", "image editing"),
    ("QwenImageImg2ImgPipeline", "Qwen-Image", "image to image"),
    ("ZImageControlNetPipeline", "Z-Image", "control images"),
    ("ZImageOmniPipeline", "Z-Image", "editing with reference images"),
    ("WanImageToVideoPipeline", "Wan", "image to video"),
    ("WanVACEPipeline", "Wan", "video editing"),
])
def test_a_familys_other_pipelines_are_refused_by_name(class_name, family, task):
    from difftune.families import family_of_class

    with pytest.raises(DifftuneError, match=f"unsupported base model family: {class_name} \\(a {family} "
                                            f"pipeline for {task}"):
        family_of_class(class_name)
