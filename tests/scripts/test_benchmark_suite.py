"""eval/benchmark.py --suite on the tiny offline pipeline (the real-model protocol with a fake subject):
sweep, grid, intervals, resume."""

import json

import numpy as np
import pytest
from conftest import command_module, make_subject_images
from PIL import Image


def suite_argv(root, tiny_clip_dir):
    return [
        "--suite",
        "--preset",
        "sd15",
        "--output_dir",
        str(root / "out"),
        "--pretrained_model_name_or_path",
        "builtin:tiny-sd",
        "--subjects_dir",
        str(root / "subjects"),
        "--methods",
        "lora",
        "sara_matched",
        "--seeds",
        "0",
        "--max_train_steps",
        "2",
        "--checkpoint_steps",
        "1",
        "2",
        "--resolution",
        "64",
        "--mixed_precision",
        "no",
        "--num_class_images",
        "2",
        "--learning_rates",
        "lora=1e-3,1e-2",
        "--learning_rates",
        "sara_matched=1e-3",
        "--sweep_extensions",
        "1",
        "--num_prompts",
        "2",
        "--images_per_prompt",
        "2",
        "--validation_images_per_prompt",
        "1",
        "--num_inference_steps",
        "2",
        "--guidance_scale",
        "1",
        "--clip_model",
        str(tiny_clip_dir),
        "--dino_model",
        "none",
        "--generation_batch_size",
        "4",
    ]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, tiny_clip_dir):
    root = tmp_path_factory.mktemp("suite")
    for name, seed in (("cat", 0), ("mug", 1)):
        folder = make_subject_images(root / "subjects" / name, 2, size=(64, 64), seed=seed)
        (folder / "subject.json").write_text(json.dumps({"identifier": "sks", "class_name": name}))
    script = command_module("benchmark")
    argv = suite_argv(root, tiny_clip_dir)
    return script, argv, root / "out", script.main(argv)


def test_suite_fills_the_grid_and_reports_intervals(suite_run):
    _, _, out, result = suite_run
    assert result["complete"] and result["subject_seed_pairs"] == [["cat", 0], ["mug", 0]]
    runs = [r for r in result["rows"] if r["method"] != "base"]
    assert sorted((r["method"], r["subject"], r["step"]) for r in runs) == sorted(
        (m, s, step) for m in ("lora", "sara_matched") for s in ("cat", "mug") for step in (1, 2)
    )
    assert all(np.isfinite(r["class_fid"]) and np.isfinite(r["clip_i"]) for r in result["rows"])
    # each checkpoint is its own adapter: step 1 and step 2 of a run were scored on different files
    lora_cat = {r["step"]: r for r in runs if r["method"] == "lora" and r["subject"] == "cat"}
    assert lora_cat[1]["adapter"].endswith("checkpoint-1/adapter.safetensors")
    assert lora_cat[1]["clip_i"] != lora_cat[2]["clip_i"]
    # the aggregate mean of a metric is the mean over subjects of the per-prompt values, recomputed here
    for step in (1, 2):
        entry = next(
            a
            for a in result["aggregates"]
            if (a["method"], a["step"], a["metric"]) == ("lora", step, "clip_i")
        )
        per_subject = []
        for subject in ("cat", "mug"):
            metrics = json.loads(
                (
                    out / "eval" / subject / "seed0" / f"step{step}" / "lora" / subject / "metrics.json"
                ).read_text()
            )
            per_subject.append(np.mean([p["clip_i"] for p in metrics["per_prompt"]]))
        assert entry["mean"]["mean"] == pytest.approx(np.mean(per_subject))
        assert entry["mean"]["low"] <= entry["mean"]["mean"] <= entry["mean"]["high"]
    diffs = [a for a in result["aggregates"] if a["method"] == "sara_matched" and a["step"] == 2]
    assert {a["metric"] for a in diffs} == {"clip_i", "clip_t", "pres_clip_i", "class_clip_t", "class_fid"}
    assert all("difference" in a for a in diffs)
    report = (out / "benchmark_suite.md").read_text()
    assert "2 of 2 (subject, seed) runs per method finished" in report and "sara_matched on CLIP-I" in report
    assert Image.open(out / "fidelity_vs_preservation.png").size == (640, 460)


def test_sweep_picks_the_rate_by_its_rule_and_sara_matches_lora(suite_run):
    _, _, out, result = suite_run
    sweep = json.loads((out / "sweep" / "selection.json").read_text())
    tried = sweep["methods"]["lora"]["tried"]
    floor = 0.9 * sweep["base"]["class_clip_t"]
    # the grid, then (--sweep_extensions 1) one rate past its edge if the edge rate wins
    rates = [t["learning_rate"] for t in tried]
    assert rates[:2] == [1e-3, 1e-2] and len(rates) <= 3
    for count in range(2, len(rates) + 1):
        so_far = tried[:count]
        keeping = [t for t in so_far if t["class_clip_t"] >= floor]
        best = (
            max(keeping, key=lambda t: t["clip_i"])
            if keeping
            else max(so_far, key=lambda t: t["class_clip_t"])
        )
        edge = max(rates[:count]) if keeping else min(rates[:count])
        if count < len(rates):
            assert best["learning_rate"] == edge
            assert rates[count] == pytest.approx(edge * 3 if keeping else edge / 3)
        elif count < 3:
            assert best["learning_rate"] != edge
    keeping = [t for t in tried if t["class_clip_t"] >= floor]
    expected = (
        max(keeping, key=lambda t: t["clip_i"]) if keeping else max(tried, key=lambda t: t["class_clip_t"])
    )["learning_rate"]
    assert sweep["methods"]["lora"]["learning_rate"] == expected == result["sweep"]["lora"]["learning_rate"]
    # the sweep drew the validation prompts, none of which is a test prompt
    validation = json.loads(
        (out / "sweep" / "lora" / "lr0.001" / "eval" / "lora" / "cat" / "metrics.json").read_text()
    )
    test = json.loads(
        (out / "eval" / "cat" / "seed0" / "step2" / "lora" / "cat" / "metrics.json").read_text()
    )
    assert not {p["prompt"] for p in validation["per_prompt"]} & {p["prompt"] for p in test["per_prompt"]}
    summaries = {
        m: json.loads((out / "runs" / "cat" / "seed0" / m / "train_summary.json").read_text())
        for m in ("lora", "sara_matched")
    }
    assert summaries["sara_matched"]["trainable_parameters"] == summaries["lora"]["trainable_parameters"]
    command = (out / "runs" / "cat" / "seed0" / "lora" / "train.log").read_text().splitlines()[0]
    assert f"--learning_rate {expected}" in command
    # wall and CPU seconds of every training and scored set, summed in the report
    timings = json.loads((out / "timings.json").read_text())
    assert timings and all(entry["cpu"] > 0 and entry["wall"] > 0 for entry in timings.values())
    for kind in ("train", "score"):
        assert result["timing"][f"{kind}_cpu_s"] == pytest.approx(
            sum(e["cpu"] for k, e in timings.items() if k.startswith(f"{kind}/")), abs=0.05)
    assert "min of CPU" in (out / "benchmark_suite.md").read_text()


def test_suite_resumes_without_training_or_drawing_again(suite_run, monkeypatch):
    script, argv, out, result = suite_run
    suite = command_module("benchmark_suite")
    calls = []
    original_train = suite.train_method

    def counting_train(settings, subject, method, flags, output_dir=None):
        calls.append(output_dir)
        return original_train(settings, subject, method, flags, output_dir=output_dir)

    monkeypatch.setattr(suite, "train_method", counting_train)
    import difftune.metrics.subject as subject_metrics

    def no_drawing(*args, **kwargs):
        raise AssertionError("a finished checkpoint was drawn again")

    monkeypatch.setattr(subject_metrics, "generate_image_sets", no_drawing)
    again = script.main(argv)
    assert again["aggregates"] == result["aggregates"] and again["rows"] == result["rows"]
    # a run cut short (final adapter lost, checkpoint-1 kept) continues from its checkpoint: only it trains
    run = out / "runs" / "mug" / "seed0" / "sara_matched"
    for name in ("adapter.safetensors", "train_summary.json"):
        (run / name).unlink()
    import shutil

    shutil.rmtree(run / "checkpoint-2")
    shutil.rmtree(out / "eval" / "mug" / "seed0" / "step2" / "sara_matched")
    monkeypatch.undo()
    monkeypatch.setattr(suite, "train_method", counting_train)
    calls.clear()
    resumed = script.main(argv)
    assert calls[-1] == run and sum(1 for c in calls if c == run) == 1
    log = (run / "train.log").read_text()
    assert "--resume_from_checkpoint latest" in log
    assert resumed["complete"] and len(resumed["rows"]) == len(result["rows"])


def test_report_only_loads_no_model_and_keeps_the_stored_fid_floor(suite_run, monkeypatch):
    script, argv, out, result = suite_run
    suite = command_module("benchmark_suite")

    def no_model(self):
        raise AssertionError("--report_only loaded a model")

    monkeypatch.setattr(suite.Suite, "pipe", property(no_model))
    monkeypatch.setattr(suite.Suite, "scorer", property(no_model))
    stored = json.loads((out / suite.RESULT_FILE).read_text())
    stored["real_vs_real_class_fid"] = {"cat": 1.25, "mug": 2.5}  # as a full run on a world reference writes
    (out / suite.RESULT_FILE).write_text(json.dumps(stored))
    report = script.main([*argv, "--report_only"])
    assert report["real_vs_real_class_fid"] == {"cat": 1.25, "mug": 2.5}
    assert report["aggregates"] == result["aggregates"] and report["rows"] == result["rows"]
    assert "1.25" in (out / "benchmark_suite.md").read_text()


def test_suite_refuses_bad_flags_before_work(tmp_path, tiny_clip_dir):
    script = command_module("benchmark")
    (tmp_path / "subjects").mkdir()
    base = suite_argv(tmp_path, tiny_clip_dir)
    with pytest.raises(SystemExit):  # the last checkpoint must be the end of training
        script.main([*base, "--checkpoint_steps", "1"])
    with pytest.raises(SystemExit):
        script.main([*base, "--learning_rates", "lora=fast"])
    from difftune.errors import DifftuneError

    with pytest.raises(DifftuneError, match="holds no subject folders"):
        script.main(base)
    assert not (tmp_path / "out").exists()


def _split_by_subject(out, here, there):
    """``out``'s grid as two folders, as two processes split by --subjects leave it: ``here`` swept the rates
    and ran cat; ``there`` got the sweep's selection and ran mug."""
    import shutil

    shutil.copytree(out, here)
    (there / "sweep").mkdir(parents=True)
    shutil.copy(out / "sweep" / "selection.json", there / "sweep" / "selection.json")
    for part in ("runs", "eval", "class_images"):
        if (out / part / "mug").is_dir():
            shutil.move(here / part / "mug", there / part / "mug")
    timings = json.loads((out / "timings.json").read_text())
    is_mug = {key: "/mug/" in key for key in timings}
    assert any(is_mug.values()) and not all(is_mug.values())
    (here / "timings.json").write_text(json.dumps({k: v for k, v in timings.items() if not is_mug[k]}))
    (there / "timings.json").write_text(json.dumps({k: v for k, v in timings.items() if is_mug[k]}))
    (here / "benchmark_suite.json").unlink()


def test_merge_from_joins_folders_split_by_subject_into_the_one_folder_report(suite_run, tmp_path,
                                                                               monkeypatch):
    script, argv, out, result = suite_run
    here, there = tmp_path / "a", tmp_path / "b"
    _split_by_subject(out, here, there)
    suite = command_module("benchmark_suite")

    def no_work(*args, **kwargs):
        raise AssertionError("--merge_from trained or drew")

    monkeypatch.setattr(suite, "train_method", no_work)
    import difftune.metrics.subject as subject_metrics

    monkeypatch.setattr(subject_metrics, "generate_image_sets", no_work)
    argv_here = [str(here) if a == str(out) else a for a in argv]
    merged = script.main([*argv_here, "--merge_from", str(there)])
    assert merged["complete"] and merged["subject_seed_pairs"] == result["subject_seed_pairs"]
    assert merged["rows"] == result["rows"] and merged["aggregates"] == result["aggregates"]
    timings = json.loads((out / "timings.json").read_text())
    assert json.loads((here / "timings.json").read_text()) == timings
    for kind in ("train", "score"):  # the report counts both folders' seconds, as the one folder did
        assert merged["timing"][f"{kind}_cpu_s"] == pytest.approx(
            sum(e["cpu"] for k, e in timings.items() if k.startswith(f"{kind}/")), abs=0.05)
    for file in (out / "runs" / "mug").rglob("*"):  # the other folder's files arrived unchanged
        copied = here / file.relative_to(out)
        if file.name == ".difftune.lock":  # a trainer's lock stays where its trainer ran
            assert not copied.exists()
            continue
        assert copied.exists() and (file.is_dir() or copied.read_bytes() == file.read_bytes())


@pytest.mark.parametrize("difference", ["rate", "sweep subject", "not a suite folder"])
def test_merge_from_refuses_folders_of_another_grid_before_copying(suite_run, tmp_path, difference):
    _, _, out, _ = suite_run
    here, there = tmp_path / "a", tmp_path / "b"
    _split_by_subject(out, here, there)
    selection = json.loads((there / "sweep" / "selection.json").read_text())
    if difference == "rate":
        selection["methods"]["lora"]["learning_rate"] *= 3
    if difference == "sweep subject":
        selection["subject"] = "mug"
    (there / "sweep" / "selection.json").write_text(json.dumps(selection))
    if difference == "not a suite folder":
        (there / "sweep" / "selection.json").unlink()
    suite = command_module("benchmark_suite")
    message = {"rate": "lora was swept to", "sweep subject": "its sweep ran on subject 'mug'",
               "not a suite folder": "not a subject benchmark folder"}[difference]
    with pytest.raises(suite.DifftuneError, match=message):
        suite.merge_grid(here, there)
    assert not (here / "runs" / "mug").exists()
    assert json.loads((here / "timings.json").read_text()) == {
        k: v for k, v in json.loads((out / "timings.json").read_text()).items() if "/mug/" not in k}
