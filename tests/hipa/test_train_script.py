"""train_scripts/train_one_step.py end to end on tiny offline models: teacher → train → save → load →
one-step image; exact resume; refusals before any model is loaded."""

import json

import numpy as np
import pytest
import torch
from conftest import train_script_runner
from PIL import Image
from safetensors.torch import load_file

import difftune
import difftune.model_factory
from difftune.errors import DifftuneError
from difftune.hipa.one_step import generate_one_step
from difftune.model_factory import load_pipeline

SIZE = 32
run_script = train_script_runner("train_one_step")


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    (folder / "train.txt").write_text("# training\na red circle\na blue square\na green star\n")
    (folder / "eval.txt").write_text("a pink heart\na cyan cross\n")
    return folder / "train.txt", folder / "eval.txt"


def command(output_dir, prompt_files, *extra, model="builtin:tiny-sd"):
    return ["--pretrained_model_name_or_path", model, "--prompts_file", str(prompt_files[0]),
            "--eval_prompts_file", str(prompt_files[1]), "--resolution", str(SIZE),
            "--teacher_num_inference_steps", "2", "--rank", "4", "--learning_rate", "1e-3", "--seed", "0",
            "--output_dir", str(output_dir), *extra]


def test_teacher_train_save_load_one_step_image(tmp_path, prompt_files):
    out = tmp_path / "run"
    adapter_path = run_script(*command(out, prompt_files, "--max_train_steps", "2", "--validation_steps", "2",
                                       "--num_validation_prompts", "2", "--checkpointing_steps", "1",
                                       "--report_to", "tensorboard"))
    # teacher caches of the training and the held-out prompts, complete
    for folder, count in ((out / "teacher", 3), (out / "teacher" / "eval", 2)):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert len(manifest["entries"]) == count and manifest["settings"]["guidance_scale"] == 7.5
        assert len(list((folder / "samples").glob("*.safetensors"))) == count
    # grids: one row per prompt, columns student | base one-step | teacher
    assert Image.open(out / "validation" / "step-000002.png").size == (3 * SIZE, 2 * SIZE)
    comparison = Image.open(out / "comparison.png")
    assert comparison.size == (3 * SIZE, 2 * SIZE)
    teacher_png = np.asarray(Image.open(out / "teacher" / "eval" / "images" / "000001.png"))
    assert np.array_equal(np.asarray(comparison)[SIZE:, 2 * SIZE:], teacher_png)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["heldout"] is True and evaluation["prompts"] == ["a pink heart", "a cyan cross"]
    assert "results" not in evaluation  # random tiny models: no metric models by default
    # the trained adapter differs from its start, and the saved file gives the saved sample
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    assert difftune.read_adapter_info(adapter_path)["config"]["rank"] == 4
    pipe = load_pipeline("builtin:tiny-sd")
    difftune.load_adapter(pipe, adapter_path)
    image = generate_one_step(pipe, "a pink heart", height=SIZE, width=SIZE,
                              generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / "one_step_sample.png")))


def test_evaluation_metrics_of_the_three_columns(tmp_path, prompt_files, tiny_clip_dir):
    out = tmp_path / "metrics"
    run_script(*command(out, prompt_files, "--max_train_steps", "1", "--teacher_guidance_scale", "1.0",
                        "--eval_clip_model", tiny_clip_dir, "--eval_fid_extractor", f"clip:{tiny_clip_dir}"))
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["results"]) == {"one-step student", "base one-step", "teacher"}
    assert evaluation["results"]["base one-step"]["fid_reference"] == "teacher samples"
    assert evaluation["results"]["base one-step"]["fid"]["generated_count"] == 2
    assert "fid" not in evaluation["results"]["teacher"]
    assert "| one-step student | 2 |" in (out / "evaluation.md").read_text()


def test_options_come_from_a_config_file_and_flags(tmp_path, prompt_files):
    from difftune.hipa.loss import HiPALossConfig
    from difftune.training.arguments import dataclass_from_args

    config = tmp_path / "hipa.yaml"
    config.write_text("teacher_num_inference_steps: 7\nedge_weight: 0.5\nhigh_pass_radius: 0.4\nrank: 8\n")
    args = run_script.module.parse_args(["--config", str(config), "--edge_weight", "0.6"])
    assert args.teacher_num_inference_steps == 7 and args.rank == 8
    assert dataclass_from_args(args, HiPALossConfig) == HiPALossConfig(edge_weight=0.6, high_pass_radius=0.4)
    # without a recipe (the embedded model has one: rank 32) LoRA defaults to HiPA's rank 16
    plain = run_script.module.parse_args(["--no_recipe"])
    assert run_script.module.adapter_options_with_defaults(plain) == {"rank": 16}


def test_resume_continues_exactly(tmp_path, prompt_files):
    teacher = ["--teacher_dir", str(tmp_path / "teacher"), "--skip_evaluation", "--checkpointing_steps", "1",
               "--validation_steps", "100"]
    def run(folder, steps, *extra):
        return run_script(*command(tmp_path / folder, prompt_files, *teacher, "--max_train_steps",
                                           str(steps), *extra))

    straight = run("straight", 3)
    run("resumed", 1)
    resumed = run("resumed", 3, "--resume_from_checkpoint", "latest")
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    with pytest.raises(DifftuneError, match="loss"):  # other loss weights: not the same run
        run("resumed", 4, "--edge_weight", "1.0", "--resume_from_checkpoint", "latest")


# on Flux the teacher guidance scale is the value of its guidance embedding
@pytest.mark.parametrize(("name", "guidance"), [("sd3", "1.0"), ("flux", "3.5")])
def test_flow_matching_model_trains(tmp_path, prompt_files, name, guidance):
    path = run_script(*command(tmp_path / name, prompt_files, "--skip_evaluation",
                                       "--max_train_steps", "1", "--teacher_guidance_scale", guidance,
                                       model=f"builtin:tiny-{name}"))
    info = difftune.read_adapter_info(path)
    assert info["component"] == "transformer" and info["fingerprint"]["class"].startswith(
        {"sd3": "SD3", "flux": "Flux"}[name])
    assert (tmp_path / name / "comparison.png").is_file()
    assert (tmp_path / name / "one_step_sample.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--prompts_file", "missing.txt"], "prompt file not found"),
    (["--teacher_num_inference_steps", "0"], "num_inference_steps"),
    (["--fourier_weight", "-1"], "fourier_weight"),
    (["--num_validation_prompts", "0"], "num_validation_prompts"),
    (["--lpips_weights", "missing.safetensors"], "lpips_weights"),
    (["--resume_from_checkpoint", "no/such/folder"], "no such checkpoint"),
    (["--eval_clip_model", "no/such/clip"], "eval_clip_model"),
])
def test_bad_input_is_refused_before_loading(tmp_path, prompt_files, extra, message, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", no_loading)
    with pytest.raises(DifftuneError, match=message):
        run_script(*command(tmp_path / "bad", prompt_files, "--max_train_steps", "1", *extra))


def test_a_video_model_is_refused_before_loading(tmp_path, prompt_files, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(difftune.model_factory, "load_pipeline", no_loading)
    refused = r"train_one_step.py \(HiPA, images\) supports .*the base model is wan"
    with pytest.raises(DifftuneError, match=refused):
        run_script(*command(tmp_path / "wan", prompt_files, "--max_train_steps", "1",
                            model="builtin:tiny-wan"))


def test_trains_on_top_of_a_frozen_adapter(tmp_path, prompt_files):
    from conftest import build, randomize_adapter

    pipe = build("sd")
    difftune.add_adapter(pipe, "sara", "attn", budget=0.02)
    randomize_adapter(pipe, std=0.01)
    base = difftune.save_adapter(pipe, tmp_path / "style.safetensors")
    adapter_path = run_script(*command(tmp_path / "run", prompt_files, "--max_train_steps", "1",
                                       "--skip_evaluation", "--base_adapter", f"{base}:0.5"))
    info = difftune.read_adapter_info(adapter_path)
    assert info["method"] == "lora"
    assert [(r["method"], r["weight"]) for r in info["base_adapters"]] == [("sara", 0.5)]
