"""eval/ scripts end to end on tiny offline models (small N): files, numbers, resume."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build, command_module, make_subject_images, randomize_adapter
from PIL import Image

import difftune
from difftune.metrics import ClipSimilarity, DinoSimilarity
from difftune.metrics.comparison import benchmark_rows
from difftune.metrics.subject import (
    EvalRun,
    GenerationSettings,
    Subject,
    class_prompts,
    evaluate_runs,
    generate_images,
    image_seed,
    load_images,
    load_prompts,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy_subject(tmp_path_factory):
    directory = make_subject_images(tmp_path_factory.mktemp("subject") / "toy", 3, seed=0)
    (directory / "subject.json").write_text(json.dumps({"identifier": "sks", "class_name": "dog"}))
    return directory


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    pipe = build("sd")
    difftune.add_adapter(pipe.unet, "lora", targets="attn", rank=2)
    randomize_adapter(pipe.unet, std=0.3)
    return difftune.save_adapter(pipe.unet, tmp_path_factory.mktemp("lora") / "adapter.safetensors")


def test_prompt_lists_have_25_prompts_and_fill_in_the_subject():
    for name in ("subject_prompts.txt", "world_subject_prompts.txt"):
        prompts = load_prompts(ROOT / "assets" / "prompts" / name, "sks", "dog")
        assert len(prompts) == 25 and len(set(prompts)) == 25
        assert all("sks dog" in p for p in prompts)


def by_hand_mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all (row of a, row of b) pairs, written out here, not taken from the library."""
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)
    return float(sum(float(x @ y) for x in a for y in b) / (len(a) * len(b)))


def by_hand_clip_t(clip: ClipSimilarity, images: list, texts: list[str]) -> float:
    """Mean 100 · cos(image i, text i) from the tiny CLIP's image and text embeddings."""
    image_features, text_features = clip.image_embeddings(images), clip.text_embeddings(texts)
    cosines = [float(i @ t / (i.norm() * t.norm()))
               for i, t in zip(image_features, text_features, strict=True)]
    return 100 * sum(cosines) / len(cosines)


def test_class_prompts_drop_the_identifier_only():
    subject = Subject("toy", Path("toy"), "sks", "dog", [])
    prompts = load_prompts(ROOT / "assets" / "prompts" / "subject_prompts.txt", "sks", "dog")
    classes = class_prompts(prompts, subject)
    assert classes[0] == "a dog on a sandy beach at sunset"
    assert classes[-1] == "a dog carved out of wood"
    assert all("sks" not in c.split() and "dog" in c.split() for c in classes)
    assert [c.replace("dog", "sks dog", 1) for c in classes] == prompts
    # an identifier the prompt would keep is refused rather than generated from
    with pytest.raises(difftune.DifftuneError, match="could not be removed"):
        class_prompts(["a <v> dog"], Subject("toy", Path("toy"), "<v>", "dog", []))


def test_image_seeds_do_not_depend_on_batch_size():
    pipe = build("sd")
    settings = {"seed": 3, "num_inference_steps": 2, "guidance_scale": 1.0, "height": 64, "width": 64}
    one = generate_images(pipe, ["a sks dog"], GenerationSettings(3, batch_size=1, **settings))[0]
    three = generate_images(pipe, ["a sks dog"], GenerationSettings(3, batch_size=3, **settings))[0]
    for a, b in zip(one, three, strict=True):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert not np.array_equal(np.asarray(one[0]), np.asarray(one[1]))


@pytest.mark.parametrize("method, targets, options", [  # the suite's methods
    ("lora", "all", {"rank": 4}), ("sara", "all", {"budget": 0.05}), ("svfit", None, {}),
    ("tlora", None, {})])
def test_merged_draw_of_prompts_and_class_prompts_equals_the_one_by_one_draw(
        tmp_path, toy_subject, tiny_clip_dir, method, targets, options):
    """What the suite draws (the adapter merged, prompts and class prompts in shared batches) is what
    the adapter draws unmerged, each list alone, one image per call (8-bit images, ±1 rounding); the
    scores agree, and the base weights come back bit for bit."""
    from difftune.metrics.cli import build_scorer, evaluation_options

    pipe = build("sd")
    difftune.add_adapter(pipe.unet, method, targets=targets, **options)
    randomize_adapter(pipe.unet, std=0.2)
    adapter = difftune.save_adapter(pipe.unet, tmp_path / "adapter.safetensors")
    difftune.remove_adapter(pipe.unet)
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    subject = Subject.from_dir(toy_subject)
    prompts = load_prompts(ROOT / "assets" / "prompts" / "subject_prompts.txt", "sks", "dog", 2)
    drawing = {"seed": 1, "num_inference_steps": 2, "guidance_scale": 3.0, "height": 64, "width": 64}

    difftune.load_adapter(pipe, adapter)
    alone = [generate_images(pipe, texts, GenerationSettings(2, batch_size=1, **drawing), show_progress=False)
             for texts in (prompts, class_prompts(prompts, subject))]
    difftune.remove_adapter(pipe)
    args = argparse.Namespace(prompts="dreambooth", num_prompts=2, clip_model=str(tiny_clip_dir),
                              dino_model="none", fid=False, fid_extractor="auto", fid_antialias=None,
                              metric_batch_size=8, device="cpu", dtype="fp32", metric_dtype="fp32",
                              images_per_prompt=2, eval_seed=1, num_inference_steps=2, guidance_scale=3.0,
                              height=64, width=64, generation_batch_size=3)
    evaluation = evaluation_options(args)
    scorer = build_scorer(evaluation, "builtin:tiny-sd", torch.device("cpu"))
    results = {}
    for merged in (True, False):
        out = tmp_path / f"merged{merged}"
        results[merged] = evaluate_runs(pipe, [EvalRun(method, adapter, subject)],
                                        ROOT / "assets" / "prompts" / "subject_prompts.txt",
                                        evaluation.generation, scorer, out, "builtin:tiny-sd", num_prompts=2,
                                        with_class_prompts=True, merge_adapters=merged)[0]
        assert all(torch.equal(v, base_state[k]) for k, v in pipe.unet.state_dict().items())
    out = tmp_path / "mergedTrue" / method / "toy"
    for folder, reference in (("images", alone[0]), ("class_images", alone[1])):
        drawn = load_images(out / folder)
        flat = [image for group in reference for image in group]
        assert len(drawn) == len(flat) == 4
        for a, b in zip(drawn, flat, strict=True):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert not np.array_equal(np.asarray(load_images(out / "images")[0]), np.asarray(alone[1][0][0]))
    for metric in ("clip_i", "clip_t", "pres_clip_i", "class_clip_t"):
        assert results[True][metric] == pytest.approx(results[False][metric], abs=2e-3)


def test_evaluate_subject_end_to_end(tmp_path, toy_subject, lora_file, tiny_clip_dir, tiny_dino_dir, capsys):
    script = command_module("evaluate_subject")
    class_dir = make_subject_images(tmp_path / "class", 5, seed=1)
    out = tmp_path / "eval"
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--adapter", f"lora={lora_file}",
            "--include_base", "--instance_data_dir", str(toy_subject), "--prompts", "dreambooth",
            "--num_prompts", "2", "--images_per_prompt", "2", "--num_inference_steps", "2", "--height", "64",
            "--width", "64", "--guidance_scale", "1", "--generation_batch_size", "3",
            "--clip_model", str(tiny_clip_dir), "--dino_model", str(tiny_dino_dir), "--fid",
            "--class_data_dir", str(class_dir), "--output_dir", str(out)]
    results = script.main(argv)

    assert [r["name"] for r in results] == ["base", "lora"]
    assert [r["method"] for r in results] == ["base", "lora"]
    for name in ("base", "lora"):
        run_dir = out / name / "toy"
        assert len(list((run_dir / "images").glob("*.png"))) == 4
        assert Image.open(run_dir / "grid.png").size[0] > 2 * 128
        assert len(list((run_dir / "class_images").glob("*.png"))) == 4
        assert Image.open(run_dir / "class_grid.png").size == Image.open(run_dir / "grid.png").size
    base_image = np.asarray(Image.open(out / "base" / "toy" / "images" / "p00_0.png"))
    lora_image = np.asarray(Image.open(out / "lora" / "toy" / "images" / "p00_0.png"))
    assert not np.array_equal(base_image, lora_image)  # the adapter was applied

    # the numbers equal a recomputation from the saved files (float32 networks: 1e-6)
    lora = results[1]
    generated = load_images(out / "lora" / "toy" / "images")
    reference = load_images(toy_subject)
    clip = ClipSimilarity.from_pretrained(tiny_clip_dir)
    dino = DinoSimilarity.from_pretrained(tiny_dino_dir)
    assert lora["clip_i"] == pytest.approx(clip.clip_i(generated, reference), abs=1e-6)
    assert lora["dino"] == pytest.approx(dino.dino(generated, reference), abs=1e-6)
    prompts = [p["prompt"] for p in lora["per_prompt"]]
    assert prompts == ["a sks dog on a sandy beach at sunset", "a sks dog in a snowy pine forest"]
    assert lora["clip_t"] == pytest.approx(
        clip.clip_t(generated, [p for p in prompts for _ in range(2)], "sks", "dog"), abs=1e-4)
    assert lora["fid"]["real_count"] == 5 and lora["fid"]["generated_count"] == 4
    assert lora["fid"]["extractor"] == f"clip:{tiny_clip_dir}"

    # prior preservation: the class prompts (no identifier), recomputed by hand from the saved class images
    class_texts = [p["prompt"] for p in lora["class_prompts"]["per_prompt"]]
    assert class_texts == ["a dog on a sandy beach at sunset", "a dog in a snowy pine forest"]
    class_generated = load_images(out / "lora" / "toy" / "class_images")
    assert len(class_generated) == lora["class_prompts"]["generated_images"] == 4
    pres = by_hand_mean_cosine(dino.image_embeddings(class_generated), dino.image_embeddings(reference))
    assert lora["pres"] == pytest.approx(pres, abs=1e-6)
    assert lora["pres"] != pytest.approx(lora["dino"], abs=1e-6)  # other images than the subject prompts'
    pres_clip_i = by_hand_mean_cosine(clip.image_embeddings(class_generated),
                                      clip.image_embeddings(reference))
    assert lora["pres_clip_i"] == pytest.approx(pres_clip_i, abs=1e-6)
    class_clip_t = by_hand_clip_t(clip, class_generated, [p for p in class_texts for _ in range(2)])
    assert lora["class_clip_t"] == pytest.approx(class_clip_t, abs=1e-4)

    # the same seeds as the subject prompts: image k of prompt p, drawn here with the pipeline directly
    from difftune.metrics.cli import load_eval_pipeline

    pipe = load_eval_pipeline("builtin:tiny-sd", torch.device("cpu"), torch.float32)
    settings = GenerationSettings(images_per_prompt=2, seed=0)
    for folder, prompt in (("images", prompts[1]), ("class_images", class_texts[1])):
        generator = torch.Generator().manual_seed(image_seed(settings, 1, 1))
        drawn = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                     generator=generator).images[0]
        saved = Image.open(out / "base" / "toy" / folder / "p01_1.png")
        assert np.abs(np.asarray(drawn, np.int16) - np.asarray(saved, np.int16)).max() <= 1

    table = (out / "results.md").read_text()
    assert ("| run | method | subject | images | DINO | CLIP-I | CLIP-T | CLIP | FID | KID | PRES "
            "| class CLIP-T |") in table
    assert "5 reference / 4 generated images" in table
    assert (out / "results.csv").read_text().count("\n") == 3
    assert (out / "results.csv").read_text().splitlines()[0].endswith(",fid,kid,pres,class_clip_t")

    # a second call reads the stored results instead of generating again
    stamp = (out / "lora" / "toy" / "images" / "p00_0.png").stat().st_mtime_ns
    capsys.readouterr()
    again = script.main(argv)
    assert "up to date" in capsys.readouterr().out
    assert (out / "lora" / "toy" / "images" / "p00_0.png").stat().st_mtime_ns == stamp
    assert again[1]["clip_i"] == lora["clip_i"]
    assert again[1]["pres"] == lora["pres"] and again[1]["class_clip_t"] == lora["class_clip_t"]


def test_evaluate_subject_takes_another_tools_lora_file(tmp_path, toy_subject, lora_file, tiny_clip_dir):
    """A kohya export of the same LoRA evaluates as the difftune file: imported, same images."""
    from difftune.export import export_adapter

    kohya = tmp_path / "lora_kohya.safetensors"
    export_adapter(lora_file, kohya, "kohya", base_model="builtin:tiny-sd", psnr_images=0)
    script = command_module("evaluate_subject")
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--adapter", f"lora={lora_file}",
            "--adapter", f"kohya={kohya}", "--instance_data_dir", str(toy_subject), "--prompts", "dreambooth",
            "--num_prompts", "1", "--images_per_prompt", "1", "--num_inference_steps", "2", "--height", "64",
            "--width", "64", "--guidance_scale", "1", "--clip_model", str(tiny_clip_dir),
            "--dino_model", "none", "--no_class_prompts", "--output_dir", str(tmp_path / "eval")]
    results = script.main(argv)
    assert [r["method"] for r in results] == ["lora", "lora"]
    images = [np.asarray(Image.open(tmp_path / "eval" / n / "toy" / "images" / "p00_0.png"), dtype=float)
              for n in ("lora", "kohya")]
    assert np.abs(images[0] - images[1]).max() <= 1  # 8-bit images of the same LoRA


def test_class_prompts_without_dino_and_switched_off(tmp_path, toy_subject, tiny_clip_dir):
    """No DINO model: PRES comes from CLIP-I and says so; --no_class_prompts removes the columns only."""
    script = command_module("evaluate_subject")
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--include_base",
            "--instance_data_dir", str(toy_subject), "--prompts", "dreambooth", "--num_prompts", "2",
            "--images_per_prompt", "2", "--num_inference_steps", "2", "--height", "64", "--width", "64",
            "--guidance_scale", "1", "--clip_model", str(tiny_clip_dir), "--dino_model", "none"]
    with_class = script.main([*argv, "--output_dir", str(tmp_path / "with")])[0]
    without = script.main([*argv, "--no_class_prompts", "--output_dir", str(tmp_path / "without")])[0]

    assert with_class["pres"] is None
    # the benchmark's per-prompt rows average back to the run's numbers (equal images per prompt)
    rows = benchmark_rows(with_class, "base", seed=0, step=0)
    assert [r["prompt_text"] for r in rows] == [p["prompt"] for p in with_class["per_prompt"]]
    assert [r["prompt"] for r in rows] == ["p00", "p01"]  # the template's place: shared across subjects
    assert len(rows) == 2
    for metric in ("clip_i", "pres_clip_i", "class_clip_t"):
        assert np.mean([r[metric] for r in rows]) == pytest.approx(with_class[metric], abs=1e-6)
    assert all("pres_clip_i" not in r for r in benchmark_rows(without, "base", 0, 0))
    clip = ClipSimilarity.from_pretrained(tiny_clip_dir)
    class_generated = load_images(tmp_path / "with" / "base" / "toy" / "class_images")
    pres_clip_i = by_hand_mean_cosine(clip.image_embeddings(class_generated),
                                      clip.image_embeddings(load_images(toy_subject)))
    assert with_class["pres_clip_i"] == pytest.approx(pres_clip_i, abs=1e-6)
    table = (tmp_path / "with" / "results.md").read_text()
    assert "| KID | PRES-CLIP-I | class CLIP-T |" in table and "| PRES |" not in table
    header = (tmp_path / "with" / "results.csv").read_text().splitlines()[0]
    assert header.endswith(",kid,pres_clip_i,class_clip_t")

    assert not {"pres", "pres_clip_i", "class_clip_t", "class_prompts"} & set(without)
    assert not (tmp_path / "without" / "base" / "toy" / "class_images").exists()
    table = (tmp_path / "without" / "results.md").read_text()
    assert "PRES" not in table and "class CLIP-T" not in table
    assert (tmp_path / "without" / "results.csv").read_text().splitlines()[0] == (
        "name,method,subject,generated_images,dino,clip_i,clip_t,clip_score,fid,kid")
    for key in ("generated_images", "dino", "clip_i", "clip_t", "clip_score", "per_prompt"):
        assert without[key] == with_class[key]  # the existing columns do not change


def test_evaluate_subject_refuses_bad_input_before_loading_models(tmp_path, toy_subject, tiny_clip_dir):
    script = command_module("evaluate_subject")
    base = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", str(toy_subject),
            "--output_dir", str(tmp_path), "--clip_model", str(tiny_clip_dir)]
    with pytest.raises(difftune.DifftuneError, match="missing.safetensors does not exist"):
        script.main([*base, "--adapter", str(tmp_path / "missing.safetensors")])
    with pytest.raises(difftune.DifftuneError, match="holds no images"):
        script.main([*base[:3], str(tmp_path), *base[4:], "--include_base", "--class_name", "dog"])
    with pytest.raises(SystemExit):
        script.main([*base, "--include_base", "--fid"])  # --fid without --class_data_dir


def _eval_bad_values(tmp_path, toy_subject):
    corrupt = make_subject_images(tmp_path / "corrupt", 1)
    (corrupt / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "a_file").write_text("")
    corrupt_adapter = tmp_path / "corrupt.safetensors"
    corrupt_adapter.write_bytes(b"\x10" + b"\x00" * 20)
    (tmp_path / "adapter.ckpt").write_bytes(b"never read")
    sdxl = build("sdxl")  # a UNet2DConditionModel too, of another layout
    difftune.add_adapter(sdxl.unet, "lora", targets="attn", rank=2)
    sdxl_adapter = difftune.save_adapter(sdxl.unet, tmp_path / "sdxl.safetensors")
    return {
        "num_prompts 0": (["--num_prompts", "0"], "--num_prompts must be at least 1, got 0"),
        "num_prompts -1": (["--num_prompts", "-1"], "--num_prompts must be at least 1, got -1"),
        "scale nan": (["--scale", "nan"], "--scale must be a finite number, got nan"),
        "guidance inf": (["--guidance_scale", "inf"], "--guidance_scale must be a finite number"),
        "images_per_prompt 0": (["--images_per_prompt", "0"], "--images_per_prompt must be at least 1"),
        "num_inference_steps 0": (["--num_inference_steps", "0"],
                                  "--num_inference_steps must be at least 1"),
        "generation_batch_size 0": (["--generation_batch_size", "0"],
                                    "--generation_batch_size must be at least 1"),
        "height 7": (["--height", "7"], "--height must be a positive multiple of 8 for builtin:tiny-sd"),
        "device bogus": (["--device", "bogus"], r"--device bogus: not a device \(cpu, cuda"),
        "missing clip model": (["--clip_model", str(tmp_path / "no_clip")],
                               "--clip_model: CLIP model folder .*no_clip does not exist"),
        "output dir is a file": (["--output_dir", str(tmp_path / "a_file")],
                                 "a_file is a file, not a folder"),
        "missing subject": (["--instance_data_dir", str(tmp_path / "nowhere")],
                            "subject folder .*nowhere does not exist"),
        "corrupt image": (["--instance_data_dir", str(corrupt), "--class_name", "dog"],
                          r"cannot read image .*broken.png \(corrupt or truncated\?\)"),
        "hub clip offline": (["--clip_model", "auto"],
                             r"--clip_model: CLIP model openai/clip-vit-large-patch14 is a hub id, the hub "
                             "is offline"),
        "corrupt adapter": (["--adapter", f"corrupt={corrupt_adapter}", "--include_base"],
                            r"--adapter corrupt: .*corrupt.safetensors: not a readable safetensors file"),
        "pickle adapter": (["--adapter", f"pickle={tmp_path / 'adapter.ckpt'}"],
                           r"--adapter pickle: .*adapter.ckpt: refusing a pickle-based file"),
        "wrong-base adapter": (["--adapter", f"sdxl={sdxl_adapter}", "--include_base"],
                               r"--adapter sdxl: .*sdxl.safetensors: base model has no module '.*' \(the "
                               r"adapter targets it\)"),
    }


@pytest.mark.parametrize("case", ["num_prompts 0", "num_prompts -1", "scale nan", "guidance inf",
                                  "images_per_prompt 0", "num_inference_steps 0", "generation_batch_size 0",
                                  "height 7", "device bogus", "missing clip model", "output dir is a file",
                                  "missing subject", "corrupt image", "hub clip offline", "corrupt adapter",
                                  "pickle adapter", "wrong-base adapter"])
def test_evaluate_subject_refuses_bad_values_in_one_line_before_loading_models(tmp_path, toy_subject,
                                                                              lora_file, tiny_clip_dir,
                                                                              monkeypatch, case):
    script = command_module("evaluate_subject")

    def no_models(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the bad value was noticed")

    monkeypatch.setattr(script, "build_scorer", no_models)
    monkeypatch.setattr(script, "load_eval_pipeline", no_models)
    flags, message = _eval_bad_values(tmp_path, toy_subject)[case]
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--adapter", str(lora_file),
            "--instance_data_dir", str(toy_subject), "--output_dir", str(tmp_path / "out"),
            "--clip_model", str(tiny_clip_dir), *flags]
    with pytest.raises(difftune.DifftuneError, match=message) as caught:
        script.main(argv)
    assert "\n" not in str(caught.value)


def test_evaluate_subject_refuses_a_prompt_the_identifier_keeps_before_loading_models(
        tmp_path, toy_subject, tiny_clip_dir, monkeypatch):
    script = command_module("evaluate_subject")

    def no_models(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the prompts were checked")

    monkeypatch.setattr(script, "build_scorer", no_models)
    monkeypatch.setattr(script, "load_eval_pipeline", no_models)
    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--include_base", "--instance_data_dir",
            str(toy_subject), "--identifier", "<v>", "--output_dir", str(tmp_path),  # "a <v> dog" keeps it
            "--clip_model", str(tiny_clip_dir)]
    with pytest.raises(difftune.DifftuneError, match="could not be removed .*--no_class_prompts"):
        script.main(argv)
    with pytest.raises(AssertionError, match="before the prompts were checked"):
        script.main([*argv, "--no_class_prompts"])  # without class prompts the identifier may stay


def test_half_precision_generation_with_adapter(tmp_path, toy_subject, lora_file, tiny_clip_dir):
    """The GPU path (pipeline in a 16-bit dtype, the loaded adapter moved to it) runs here in bf16."""
    script = command_module("evaluate_subject")
    results = script.main(["--pretrained_model_name_or_path", "builtin:tiny-sd", "--adapter", str(lora_file),
                           "--instance_data_dir", str(toy_subject), "--dtype", "bf16", "--num_prompts", "1",
                           "--images_per_prompt", "1", "--num_inference_steps", "2", "--height", "64",
                           "--width", "64", "--guidance_scale", "1", "--clip_model", str(tiny_clip_dir),
                           "--dino_model", "none",
                           "--output_dir", str(tmp_path)])
    assert results[0]["dino"] is None and np.isfinite(results[0]["clip_i"])
    image = np.asarray(Image.open(tmp_path / results[0]["name"] / "toy" / "images" / "p00_0.png"))
    assert image.std() > 0
