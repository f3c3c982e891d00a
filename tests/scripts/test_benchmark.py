"""eval/benchmark.py end to end on the tiny offline pipeline: trains through train_subject.py, resumes."""

import json

import numpy as np
import pytest
from conftest import build, command_module, make_subject_images
from PIL import Image

import difftune
from difftune.commands import benchmark_runs


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("benchmark")
    subject = make_subject_images(root / "subject", 3, size=(64, 64))
    (subject / "subject.json").write_text(json.dumps({"identifier": "sks", "class_name": "dog"}))
    methods = [m for m in ("lora", "sara") if m in difftune.METHODS]
    argv = ["--output_dir", str(root / "out"), "--pretrained_model_name_or_path", "builtin:tiny-sd",
            "--instance_data_dir", str(subject), "--methods", *methods, "--max_train_steps", "2",
            "--train_batch_size", "1", "--resolution", "64", "--seed", "5", "--num_class_images", "3",
            "--prompts", "dreambooth", "--num_prompts", "1", "--images_per_prompt", "2",
            "--num_inference_steps", "2", "--guidance_scale", "1", "--clip_model", str(tiny_clip_dir)]
    script = command_module("benchmark")
    rows = script.main(argv)
    return script, argv, root / "out", methods, rows


def test_benchmark_trains_evaluates_and_tabulates(benchmark_run):
    _, _, out, methods, rows = benchmark_run
    assert [r["method"] for r in rows] == ["base", *methods]
    for method in methods:
        summary = json.loads((out / "train" / method / "train_summary.json").read_text())
        assert summary["steps"] == 2 and summary["seed"] == 5 and summary["method"] == method
        # the trainable count in the table is the adapter's, counted again on a fresh pipeline
        pipe = build("sd")
        difftune.load_adapter(pipe, out / "train" / method / "adapter.safetensors")
        row = next(r for r in rows if r["method"] == method)
        assert row["trainable_parameters"] == difftune.count_trainable_parameters(pipe.unet)
        assert row["step_time_s"] > 0 and row["peak_memory_gib"] > 0
        assert np.isfinite(row["fid"]) and np.isfinite(row["clip_t"])
    if "sara" in methods:  # comparable budget: SaRA trains as many parameters as LoRA
        lora, sara = (next(r for r in rows if r["method"] == m) for m in ("lora", "sara"))
        assert sara["trainable_parameters"] == lora["trainable_parameters"]
    table = (out / "benchmark.md").read_text()
    assert "| method | trainable params | peak memory (GiB) | step time (s) | FID ↓ |" in table
    assert "3 reference / 2 generated images" in table
    assert (out / "benchmark.csv").read_text().count("\n") == len(rows) + 1
    for plot in ("fid_vs_params.png", "clip_t_vs_dino.png", "pres_vs_fidelity.png"):
        assert Image.open(out / plot).size == (640, 460)


def run_metrics(out, method: str) -> dict:
    return json.loads(next((out / "eval" / method).glob("*/metrics.json")).read_text())


def test_benchmark_reports_what_each_method_cost_the_class(benchmark_run):
    """PRES and class CLIP-T sit beside the subject numbers, from each run's own class-prompt images."""
    _, _, out, _, rows = benchmark_run
    table = (out / "benchmark.md").read_text()
    assert "| CLIP-T ↑ | PRES-CLIP-I ↓ | class CLIP-T ↑ | VLHI ↑ |" in table  # no DINO model: CLIP-I PRES
    for row in rows:
        metrics = run_metrics(out, row["method"])
        class_images = sorted(next((out / "eval" / row["method"]).glob("*/class_images")).iterdir())
        assert len(class_images) == 2  # 1 prompt × 2 images, the identifier removed
        assert row["pres_clip_i"] == metrics["pres_clip_i"] and np.isfinite(row["pres_clip_i"])
        assert row["class_clip_t"] == metrics["class_clip_t"] and row["pres"] is None
    header = (out / "benchmark.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("clip_t") + 1: header.index("vlhi")] == ["pres_clip_i", "class_clip_t"]


def test_benchmark_without_class_prompts_has_no_prior_columns(benchmark_run, tmp_path):
    script, argv, out, methods, rows = benchmark_run
    args = script.parse_args([*argv, "--no_class_prompts"])
    args.output_dir = tmp_path
    results = {r["method"]: {**run_metrics(out, r["method"]), "class_clip_t": None, "pres_clip_i": None}
               for r in rows}
    text = script.write_report(args, script.benchmark_rows(methods, {}, results), results, {"cpu": "x"})
    assert "| CLIP-T ↑ | VLHI ↑ |" in text and "PRES" not in text
    assert not (tmp_path / "pres_vs_fidelity.png").exists()


def test_benchmark_resumes_without_retraining(benchmark_run, capsys):
    script, argv, out, methods, rows = benchmark_run
    stamps = {m: (out / "train" / m / "adapter.safetensors").stat().st_mtime_ns for m in methods}
    capsys.readouterr()
    again = script.main(argv)
    printed = capsys.readouterr().out
    for method in methods:
        assert f"{method}: trained already" in printed
        assert (out / "train" / method / "adapter.safetensors").stat().st_mtime_ns == stamps[method]
    assert "up to date" in printed
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_interrupted_training_resumes_from_its_checkpoint(benchmark_run, tmp_path):
    script, argv, _, _, _ = benchmark_run
    args = script.parse_args([*argv[:1], str(tmp_path), *argv[2:]])
    train_dir = tmp_path / "train" / "lora"
    (train_dir / "checkpoint-1").mkdir(parents=True)
    subject = script.Subject.from_dir(args.instance_data_dir)
    command = benchmark_runs.trainer_command(args, subject, "lora", ["--rank", "4"], train_dir)
    assert command[-2:] == ["--resume_from_checkpoint", "latest"]
    assert command[command.index("--max_train_steps") + 1] == "2"


def test_a_prompt_the_identifier_cannot_leave_is_refused_before_training(benchmark_run, tmp_path):
    script, argv, _, _, _ = benchmark_run
    out = tmp_path / "out"
    argv = [*argv[:1], str(out), *argv[2:], "--identifier", "<v>"]  # not a word: "a <v> dog" keeps it
    with pytest.raises(script.DifftuneError, match="could not be removed .*--no_class_prompts"):
        script.main(argv)
    assert not out.exists()  # nothing trained, no class images made


@pytest.mark.parametrize(("flags", "message"), [
    (["--train_args", "--learning_rate nan"], "trainer flags of lora: --learning_rate must be a finite"),
    (["--train_args", "--adam_beta1 2"], r"trainer flags of lora: --adam_beta1 must be in \[0, 1\)"),
    (["--method_args", "lora=--rank 0"], "trainer flags of lora: .*'rank' must be a positive integer"),
    (["--train_args=--no_such_flag"], "trainer flags of lora refused by train_subject.py"),
    (["--resolution", "63"], "trainer flags of lora: --resolution must be a multiple of 8"),
])
def test_trainer_flags_are_checked_by_the_trainer_before_any_heavy_work(tmp_path, monkeypatch, flags,
                                                                        message):
    script = command_module("benchmark")
    subject = make_subject_images(tmp_path / "subject", 2, size=(64, 64))
    (subject / "subject.json").write_text(json.dumps({"identifier": "sks", "class_name": "dog"}))

    def heavy(*_args, **_kwargs):
        raise AssertionError("heavy work started before the trainer flags were checked")

    monkeypatch.setattr(script, "load_eval_pipeline", heavy)
    monkeypatch.setattr(script, "train_method", heavy)
    argv = ["--output_dir", str(tmp_path / "out"), "--pretrained_model_name_or_path", "builtin:tiny-sd",
            "--instance_data_dir", str(subject), "--methods", "lora", "--max_train_steps", "2",
            "--prompts", "dreambooth", "--num_prompts", "1", "--clip_model", str(tmp_path), *flags]
    (tmp_path / "config.json").write_text("{}")  # a CLIP folder as far as the source check goes
    with pytest.raises(script.DifftuneError, match=message):
        script.main(argv)


def test_benchmark_refuses_unknown_methods_and_bad_method_args(tmp_path, capsys):
    script = command_module("benchmark")
    cases = ((["--method_args", "lora=--targets 'attn"],
              "--method_args \"lora=--targets 'attn\": cannot split the flags: No closing quotation"),
             (["--train_args", "--rank '4"], "--train_args \"--rank '4\": cannot split the flags"))
    for flags, message in cases:
        with pytest.raises(SystemExit):
            script.parse_args(["--output_dir", str(tmp_path), "--methods", "lora", *flags])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", str(tmp_path), "--methods", "lora", "nomethod"])
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", str(tmp_path), "--methods", "lora",
                           "--method_args", "svfit=--rank 2"])


def test_sd15_preset_is_one_flag(tmp_path):
    script = command_module("benchmark")
    args = script.parse_args(["--preset", "sd15", "--output_dir", str(tmp_path)])
    assert args.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (args.resolution, args.mixed_precision) == (512, "fp16")
    assert (args.clip_model, args.dino_model) == ("openai/clip-vit-large-patch14", "facebook/dino-vits16")
    embedded = script.parse_args(["--output_dir", str(tmp_path)])
    assert embedded.pretrained_model_name_or_path == "builtin:embedded"
    assert embedded.max_train_steps == args.max_train_steps // 2 and embedded.fid


def test_folders_of_one_grid_join_cell_by_cell_never_mixing_two_runs(tmp_path):
    """`copy_missing_files`: a cell (a run, a scored set) moves whole; a finished one wins over an
    unfinished one, the target's wins when both are finished or both unfinished; loose files fill gaps."""
    def write(folder, files):
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    write(ours, {"runs/a/seed0/lora/checkpoint-1/adapter.safetensors": "ours 1",  # ours unfinished
                 "runs/a/seed0/sara/train_summary.json": "ours",
                 "runs/a/seed0/sara/adapter.safetensors": "ours",
                 "runs/a/seed0/svfit/checkpoint-1/adapter.safetensors": "ours 1",  # both unfinished
                 "class_images/a/0.png": "ours"})
    write(theirs, {"runs/a/seed0/lora/checkpoint-1/adapter.safetensors": "theirs 1",
                   "runs/a/seed0/lora/checkpoint-2/adapter.safetensors": "theirs 2",
                   "runs/a/seed0/lora/train_summary.json": "theirs",
                   "runs/a/seed0/lora/.difftune.lock": "pid",
                   "runs/a/seed0/sara/train_summary.json": "theirs",
                   "runs/a/seed0/sara/checkpoint-9/adapter.safetensors": "theirs 9",
                   "runs/a/seed0/svfit/checkpoint-2/adapter.safetensors": "theirs 2",
                   "runs/b/seed0/lora/train_summary.json": "theirs b",  # ours lacks it
                   "class_images/a/0.png": "theirs", "class_images/a/1.png": "theirs"})
    counts = benchmark_runs.copy_missing_files(theirs, ours, ("runs", "class_images"),
                                               cells=("runs/*/seed*/*",))
    files = {p.relative_to(ours).as_posix(): p.read_text() for p in ours.rglob("*") if p.is_file()}
    assert files == {
        # theirs finished, ours not: theirs whole, none of our checkpoint left beside it; no lock file
        "runs/a/seed0/lora/checkpoint-1/adapter.safetensors": "theirs 1",
        "runs/a/seed0/lora/checkpoint-2/adapter.safetensors": "theirs 2",
        "runs/a/seed0/lora/train_summary.json": "theirs",
        # both finished: ours as it was, nothing of theirs added into it
        "runs/a/seed0/sara/train_summary.json": "ours", "runs/a/seed0/sara/adapter.safetensors": "ours",
        # both unfinished: ours as it was (it resumes from its own checkpoint)
        "runs/a/seed0/svfit/checkpoint-1/adapter.safetensors": "ours 1",
        "runs/b/seed0/lora/train_summary.json": "theirs b",
        "class_images/a/0.png": "ours", "class_images/a/1.png": "theirs",
    }
    assert counts == {"copied": 5, "kept": 4}
