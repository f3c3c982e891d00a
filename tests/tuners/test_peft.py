"""The ``peft`` method: peft's tuners (LoHa, LoKr, OFT, DoRA, SHiRA, Super-Tuning) under difftune's contract,
each checked against peft itself (the same config injected with `peft.inject_adapter_in_model`)."""

import json

import numpy as np
import pytest
import torch
from conftest import build, denoise, denoiser_inputs, randomize_adapter
from peft import (
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    ShiraConfig,
    SupertuningConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from PIL import Image
from safetensors.torch import load_file

import difftune
from difftune.api import find_denoiser
from difftune.errors import DifftuneError, TargetError
from difftune.model_factory import build_denoiser_on_meta, load_pipeline
from difftune.sampling import GenerationSettings, generate_images
from difftune.training import arguments

# difftune options of each type, and the peft config a user of peft would write for the same adapter
TYPES = {
    "loha": ({"rank": 4, "alpha": 8.0}, lambda: LoHaConfig(r=4, alpha=8.0)),
    "lokr": ({"rank": 4, "options": {"decompose_both": True}}, lambda: LoKrConfig(r=4, decompose_both=True)),
    "oft": ({"rank": 4}, lambda: OFTConfig(r=4, oft_block_size=0)),
    "dora": ({"rank": 4}, lambda: LoraConfig(r=4, use_dora=True)),
    "shira": ({"rank": 2, "options": {"random_seed": 7}}, lambda: ShiraConfig(r=2, random_seed=7)),
    "supertuning": ({"options": {"sparsity": 0.9}}, lambda: SupertuningConfig(sparsity=0.9)),
}
DENOISERS = ["sd", "sd3"]  # a tiny UNet and a tiny DiT (SD3's MMDiT)


def attached(family, peft_type, targets="attn", pipe=None):
    pipe = pipe or build(family)
    model, _ = find_denoiser(pipe)
    options, _ = TYPES[peft_type]
    difftune.add_adapter(model, "peft", targets=targets, type=peft_type, **options)
    return pipe, model


def live_modules(model, inputs, names):
    """The modules among ``names`` whose output reaches the model's output (a gradient of a scale on it)."""
    scales = {name: torch.ones((), requires_grad=True) for name in names}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, a, out, s=scales[name]: out * s)
             for name in names]
    model(**inputs, return_dict=False)[0].square().mean().backward()
    for hook in hooks:
        hook.remove()
    return {name for name, scale in scales.items() if scale.grad is not None and scale.grad != 0}


@pytest.mark.parametrize("family", DENOISERS)
@pytest.mark.parametrize("peft_type", list(TYPES))
def test_attach_equals_peft_and_gradients_reach_every_trainable_tensor(family, peft_type):
    pipe, model = attached(family, peft_type)
    inputs = denoiser_inputs(pipe)
    reference_pipe = build(family)
    reference, _ = find_denoiser(reference_pipe)
    base = denoise(reference_pipe, inputs)
    torch.testing.assert_close(denoise(pipe, inputs), base, atol=1e-6, rtol=0)

    adapter = difftune.get_adapter(model)
    _, peft_config = TYPES[peft_type]
    config = peft_config()
    config.target_modules = list(adapter.target_names)
    inject_adapter_in_model(config, reference)
    peft_count = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert difftune.count_trainable_parameters(model) == peft_count > 0

    randomize_adapter(model)
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    torch.testing.assert_close(denoise(pipe, inputs), denoise(reference_pipe, inputs), atol=0, rtol=0)

    trainable = dict(difftune.named_trainable_parameters(model))
    model(**inputs, return_dict=False)[0].square().mean().backward()
    live = live_modules(find_denoiser(build(family))[0], inputs, adapter.target_names)
    assert live, "no targeted module reaches the output"
    for name, param in trainable.items():
        module = next(target for target in adapter.target_names if name.startswith(f"{target}."))
        assert param.grad is not None, name
        if module in live:
            assert param.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert not any(p.grad is not None for n, p in model.named_parameters() if n not in trainable)


def test_trainable_counts_follow_the_closed_forms():
    """LoHa: two rank-r Hadamard factors of (in + out) each; DoRA: LoRA's r·(in + out) plus a magnitude
    per output row."""
    forms = {"loha": lambda i, o: 2 * 4 * (i + o), "dora": lambda i, o: 4 * (i + o) + o}
    for peft_type, per_layer in forms.items():
        _, model = attached("sd", peft_type)
        adapter = difftune.get_adapter(model)
        expected = sum(per_layer(m.in_features, m.out_features)
                       for m in (layer.get_base_layer() for layer in adapter.layers.values()))
        assert difftune.count_trainable_parameters(model) == expected


@pytest.mark.parametrize("family", DENOISERS)
@pytest.mark.parametrize("peft_type", list(TYPES))
def test_merge_scale_save_reload_and_remove(family, peft_type, tmp_path):
    pipe = build(family)
    inputs = denoiser_inputs(pipe)
    base = denoise(pipe, inputs)
    originals = {k: v.clone() for k, v in find_denoiser(pipe)[0].state_dict().items()}
    pipe, model = attached(family, peft_type, pipe=pipe)
    randomize_adapter(model)
    adapted = denoise(pipe, inputs)
    assert (adapted - base).abs().max() > 1e-4

    difftune.merge_adapter(model, unload=False)
    torch.testing.assert_close(denoise(pipe, inputs), adapted, atol=2e-5, rtol=1e-4)
    difftune.unmerge_adapter(model)
    assert torch.equal(denoise(pipe, inputs), adapted)
    difftune.set_adapter_scale(model, 0.5)
    half = denoise(pipe, inputs)
    difftune.merge_adapter(model, unload=False)
    torch.testing.assert_close(denoise(pipe, inputs), half, atol=2e-5, rtol=1e-4)
    difftune.unmerge_adapter(model)
    difftune.set_adapter_scale(model, 1.0)

    path = difftune.save_adapter(model, tmp_path / "adapter.safetensors", base_model=f"builtin:tiny-{family}")
    info = difftune.read_adapter_info(path)
    assert info["method"] == "peft" and info["config"]["type"] == peft_type and "sha256" in info
    assert info["extra"]["peft_config"]["peft_type"].lower() in (peft_type, "lora")
    assert set(info["fingerprint"]["shapes"]) == set(difftune.get_adapter(model).target_names)
    saved = load_file(path)
    fresh_pipe = build(family)
    fresh, _ = find_denoiser(fresh_pipe)
    difftune.load_adapter(fresh, path)
    assert torch.equal(denoise(fresh_pipe, inputs), adapted)
    again = get_peft_model_state_dict(fresh)
    assert all(torch.equal(saved[f"{find_denoiser(pipe)[1]}.{k}"], v) for k, v in again.items())

    difftune.remove_adapter(model)
    assert torch.equal(denoise(pipe, inputs), base)
    state = model.state_dict()
    assert state.keys() == originals.keys()
    assert all(torch.equal(state[k], originals[k]) for k in state)
    assert not hasattr(model, "peft_config")


@pytest.mark.parametrize(("peft_type", "reason"), [
    ("shira", "peft refuses it"), ("supertuning", "peft refuses it"),
    ("oft", "merged layer differs from its unmerged forward"),  # peft 0.21's OFT on a k×k conv
])
def test_a_type_that_cannot_take_the_targeted_layers_is_refused_naming_them(peft_type, reason):
    pipe = build("sd")
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    options, _ = TYPES[peft_type]
    refusal = rf"'{peft_type}' cannot adapt (.*; )?Conv2d 3x3 layers \((peft.s )?{reason}.*"
    with pytest.raises(TargetError, match=refusal + r"down_blocks\.0\.resnets\.0\.conv1"):
        difftune.add_adapter(pipe.unet, "peft", targets="conv", type=peft_type, **options)
    assert not difftune.has_adapter(pipe.unet)
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    # the same refusal on a weightless model, as a trainer checks before loading
    meta = build_denoiser_on_meta(dict(pipe.unet.config), type(pipe.unet).__name__)
    with pytest.raises(TargetError, match="cannot adapt (.*; )?Conv2d 3x3 layers"):
        difftune.check_adapter(meta, "peft", targets="conv", type=peft_type, **options)
    # attention layers are fine for all three
    difftune.check_adapter(meta, "peft", targets="attn", type=peft_type, **options)


def test_bad_types_and_options_are_named():
    model = build("sd").unet
    with pytest.raises(DifftuneError, match=r"unknown peft method 'lohaa'.*loha.*lokr"):
        difftune.add_adapter(model, "peft", type="lohaa")
    with pytest.raises(DifftuneError, match=r"'decompose_bot' is not a field of peft's LoKrConfig.*"
                                            r"decompose_both"):
        difftune.add_adapter(model, "peft", type="lokr", options={"decompose_bot": True})
    with pytest.raises(DifftuneError, match=r"'target_modules' cannot be set: the layers come from "
                                            r"--targets"):
        difftune.add_adapter(model, "peft", type="loha", options={"target_modules": ["to_q"]})
    with pytest.raises(DifftuneError, match=r"'bias' must be 'none'"):
        difftune.add_adapter(model, "peft", type="dora", options={"bias": "all"})
    with pytest.raises(DifftuneError, match=r"type 'boft' has no rank"):
        difftune.add_adapter(model, "peft", type="boft", rank=4)
    with pytest.raises(DifftuneError, match=r"SupertuningConfig \(supertuning\) refuses.*"
                                            r"sparsity must be in"):
        difftune.add_adapter(model, "peft", type="supertuning", options={"sparsity": 1.5})
    with pytest.raises(DifftuneError, match=r"'options' must be a JSON object"):
        difftune.add_adapter(model, "peft", type="loha", options="{decompose: yes")
    assert not difftune.has_adapter(model)


def test_flags_reach_the_peft_config(tmp_path):
    import argparse

    import yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    arguments.add_model_arguments(parser)
    arguments.add_training_arguments(parser)
    args = arguments.parse_with_config(parser, ["--adapter", "peft", "--peft_type", "lokr", "--rank", "6",
                                                "--alpha", "3", "--peft_options", '{"decompose_both": true}'])
    config = arguments.adapter_spec(args).config.peft_config()
    assert isinstance(config, LoKrConfig)
    assert (config.r, config.alpha, config.decompose_both) == (6, 3.0, True)
    # a YAML --config holds the options as a mapping
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"adapter": "peft", "peft_type": "supertuning",
                                    "peft_options": {"sparsity": 0.95, "select_top": False}}))
    config = arguments.adapter_spec(arguments.parse_with_config(parser, ["--config", str(path)])).config
    peft_config = config.peft_config()
    assert isinstance(peft_config, SupertuningConfig)
    assert (peft_config.sparsity, peft_config.select_top) == (0.95, False)
    assert json.loads(json.dumps(config.to_dict()))["options"] == {"sparsity": 0.95, "select_top": False}


@pytest.mark.parametrize("peft_type", list(TYPES))
def test_diff_export_round_trips(peft_type, tmp_path):
    """ComfyUI and A1111 apply a diff as W ← W + Δ: doing so on a fresh base gives the adapter's outputs."""
    from difftune.export import export_adapter

    pipe, model = attached("sd", peft_type, targets="attn")
    randomize_adapter(model)
    inputs = denoiser_inputs(pipe)
    adapted = denoise(pipe, inputs)
    path = difftune.save_adapter(model, tmp_path / "adapter.safetensors", base_model="builtin:tiny-sd")
    difftune.remove_adapter(model)
    report = export_adapter(path, tmp_path / "diff.safetensors", "diff", pipeline=pipe)
    assert report.exact and not difftune.has_adapter(pipe)
    diffs = load_file(tmp_path / "diff.safetensors")
    modules = {f"lora_unet_{name.replace('.', '_')}": name for name, _ in pipe.unet.named_modules()}
    with torch.no_grad():
        for key, delta in diffs.items():
            stem, suffix = key.rsplit(".", 1)
            attribute = {"diff": "weight", "diff_b": "bias"}[suffix]
            tensor = getattr(pipe.unet.get_submodule(modules[stem]), attribute)
            tensor.add_(delta.to(tensor.dtype))
    assert len(diffs) == len(difftune.read_adapter_info(path)["targets"])
    torch.testing.assert_close(denoise(pipe, inputs), adapted, atol=2e-5, rtol=1e-4)


def test_training_run_through_the_subject_trainer(train_subject, subject_dir, tmp_path):
    out = tmp_path / "out"
    train_subject("--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", subject_dir,
                  "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--max_train_steps", 2,
                  "--adapter", "peft", "--peft_type", "loha", "--rank", 2, "--targets", "attn", "conv",
                  "--learning_rate", 1e-2, "--report_to", "none", "--seed", 0, "--num_validation_images", 1,
                  "--validation_inference_steps", 2)
    info = difftune.read_adapter_info(out / "adapter.safetensors")
    assert info["method"] == "peft" and info["config"]["type"] == "loha" and info["config"]["rank"] == 2
    assert info["extra"]["peft_config"]["r"] == 2
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # not a diffusers LoRA file
    tensors = load_file(out / "adapter.safetensors")
    assert any(k.endswith("hada_w1_a") and ".conv1." in k for k in tensors)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in tensors.items() if "hada_w2_b" in k)
    # the final samples came from a fresh pipeline holding the file: loading it again gives them again
    fresh = load_pipeline("builtin:tiny-sd")
    difftune.load_adapter(fresh, out / "adapter.safetensors")
    settings = GenerationSettings(1, 0, num_inference_steps=2, guidance_scale=None, height=64, width=64,
                                  batch_size=1)
    (again,) = generate_images(fresh, ["a photo of sks disc"], settings, show_progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out / "samples.png")), np.asarray(again))


def test_the_method_page_examples_run(train_subject, tmp_path, monkeypatch):
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "methods" / "peft.md").read_text()
    python = page.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(python, "docs/methods/peft.md", "exec"), {})
    info = difftune.read_adapter_info(tmp_path / "outputs/peft/adapter.safetensors")
    assert info["config"]["options"] == {"decompose_both": True}
    bash = page.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    import shlex

    argv = shlex.split(bash)
    assert argv[:2] == ["python", "train_scripts/train_subject.py"]
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    args = train_subject.module.parse_args(argv[2:])
    spec = arguments.adapter_spec(args)
    assert isinstance(spec.config.peft_config(), SupertuningConfig)
    assert spec.config.peft_config().select_top is False
