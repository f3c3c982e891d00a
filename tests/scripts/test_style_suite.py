"""The style benchmark's machinery on the tiny models (difftune/commands/style_suite.py): budgets,
sweep, grid, scores, intervals, paired differences, VLHI, plots, resuming."""

import json
import time

import pytest
import torch
from conftest import command_module, train_script_runner

import difftune
from difftune.metrics.fid import frechet_distance
from difftune.metrics.vlhi import vlhi

SMALL = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--styles", "rose", "neon",
         "--train_images", 8, "--test_captions", 8, "--validation_captions", 4, "--plain_captions", 6,
         "--world_images", 8, "--max_train_steps", 2, "--checkpoint_steps", 1, 2, "--train_batch_size", 2,
         "--num_inference_steps", 2, "--generation_batch", 8, "--levels", "5M", "20M", "--resamples", 60,
         "--sweep_extensions", 0]  # the edge rule: its own test below


@pytest.fixture(scope="module")
def suite_module():
    return command_module("style_suite")


@pytest.fixture
def in_process_trainer(monkeypatch, suite_module):
    """The dataset trainer in this process (the suite runs it as a subprocess), counting its runs."""
    trainer = train_script_runner("train_text_to_image")
    runs = []

    def run_trainer(command, output_dir, label, retrain=False, quiet=False):
        if (output_dir / "train_summary.json").is_file():
            return json.loads((output_dir / "train_summary.json").read_text())
        runs.append(label)
        started = time.perf_counter()
        trainer(*command[3:])  # python -m <module> <flags>
        summary = json.loads((output_dir / "train_summary.json").read_text())
        return {**summary, "wall_time_s": time.perf_counter() - started, "process_cpu_seconds": None}

    monkeypatch.setattr(suite_module, "run_trainer", run_trainer)
    return runs


def run(suite_module, out, clip, *extra):
    return suite_module.main([str(a) for a in [*SMALL, "--output_dir", out, "--clip_model", clip, *extra]])


def test_the_grid_scores_every_cell_and_reports_intervals(suite_module, in_process_trainer, tiny_clip_dir,
                                                          tmp_path):
    out = tmp_path / "suite"
    report = run(suite_module, out, tiny_clip_dir, "--methods", "lora", "sara", "full_ft", "--rates", 2)
    # the sweep: two rates per method on the first domain, the lower validation FID kept
    selection = report["settings"]["learning_rates"]
    for method in ("lora", "sara", "full_ft"):
        tried = selection[method]["tried"]
        assert len(tried) == 2 and selection[method]["domain"] == "rose"
        assert selection[method]["rate"] == min(tried, key=lambda t: t["fid_validation"])["rate"]
    # budgets: SaRA's count is its level exactly, LoRA's rank the nearest to it
    budgets = report["settings"]["budgets"]
    assert budgets["sara@20M"]["trainable_parameters"] == budgets["sara@20M"]["target"]
    rank = budgets["lora@20M"]["options"]["rank"]
    pipe = difftune.model_factory.load_pipeline("builtin:tiny-sd")
    counts = {}
    for r in (rank - 1, rank, rank + 1):
        difftune.add_adapter(pipe.unet, "lora", targets="attn", rank=r)
        counts[r] = difftune.count_trainable_parameters(pipe.unet)
        difftune.remove_adapter(pipe.unet)
    target = budgets["lora@20M"]["target"]
    assert min(counts, key=lambda r: abs(counts[r] - target)) == rank
    assert budgets["lora@5M"]["trainable_parameters"] < budgets["lora@20M"]["trainable_parameters"]
    # rows: every matched row x domain x checkpoint, the budget curve's other levels at the last one
    rows = report["rows"]
    matched, curve = {"lora@20M", "sara@20M", "full_ft"}, {"lora@5M", "sara@5M"}
    expected = {(n, s, k) for n in matched for s in ("rose", "neon") for k in (1, 2)}
    expected |= {(n, s, 2) for n in curve for s in ("rose", "neon")}
    expected |= {("base", s, 0) for s in ("rose", "neon")}
    assert {(r["row"], r["style"], r["step"]) for r in rows} == expected
    assert not (out / "scores/rose/seed0/lora@5M/step1.json").exists()
    cell = json.loads((out / "scores/neon/seed0/sara@20M/step2.json").read_text())
    features = torch.load(out / "scores/neon/seed0/sara@20M/step2.pt", weights_only=True)
    reference = torch.load(out / "cache/neon_heldout.pt", weights_only=True)
    assert cell["fid_heldout"] == pytest.approx(frechet_distance(reference, features["styled"]))
    assert len(cell["clip"]) == 8 and len(cell["drift"]) == len(cell["color"]) == 6
    assert all(0 <= d <= 2 for d in cell["drift"])
    # aggregates: intervals around the mean of the domains; paired differences to LoRA at the same budget
    by_row = {(a["row"], a["step"]): a for a in report["aggregates"]}
    sara = by_row[("sara@20M", 2)]
    for metric in ("fid_heldout", "fid_train", "clip", "drift", "fid_world", "color", "shape"):
        assert sara[metric]["low"] <= sara[metric]["mean"] <= sara[metric]["high"]
    domain_cells = [json.loads((out / f"scores/{s}/seed0/sara@20M/step2.json").read_text())
                    for s in ("rose", "neon")]
    assert sara["fid_heldout"]["mean"] == pytest.approx(sum(c["fid_heldout"] for c in domain_cells) / 2)
    lora = by_row[("lora@20M", 2)]
    assert sara["clip_vs_lora"]["mean"] == pytest.approx(sara["clip"]["mean"] - lora["clip"]["mean"])
    assert sara["fid_heldout_vs_lora"]["mean"] == pytest.approx(sara["fid_heldout"]["mean"]
                                                                - lora["fid_heldout"]["mean"])
    assert "clip_vs_lora" in by_row[("sara@5M", 2)] and "clip_vs_lora" in by_row[("full_ft", 2)]
    # VLHI within the matched group at the last checkpoint, as metrics.vlhi computes it
    group = report["settings"]["vlhi_group"]
    assert set(group) == {"lora@20M", "sara@20M", "full_ft"}
    expected = vlhi({g: by_row[(g, 2)]["fid_heldout"]["mean"] for g in group},
                    {g: by_row[(g, 2)]["clip"]["mean"] for g in group})
    assert all(by_row[(g, 2)]["vlhi"] == pytest.approx(expected[g]) for g in group)
    assert (out / "fid_vs_drift.png").is_file() and (out / "fid_vs_params.png").is_file()
    assert "| sara@20M |" in (out / "style_benchmark.md").read_text()
    # who leads each metric in that group, and SaRA against the others: the same paired differences
    contest = report["comparisons"]
    assert contest["group"] == group and contest["step"] == 2
    for metric, higher in (("fid_heldout", False), ("clip", True), ("drift", False)):
        entry = contest["leaders"][metric]
        means = {g: by_row[(g, 2)][metric]["mean"] for g in group}
        assert entry["best"] == (max if higher else min)(means, key=means.get)
        assert set(entry["vs_best"]) == set(group) - {entry["best"]}
        for row, difference in entry["vs_best"].items():
            assert difference["mean"] == pytest.approx(means[row] - means[entry["best"]])
        assert entry["not_told_apart"] == sorted(r for r, d in entry["vs_best"].items()
                                                 if d["low"] <= 0 <= d["high"])
    assert set(contest["sara_vs"]) == {"sara@20M − lora@20M", "sara@20M − full_ft"}
    versus_full = contest["sara_vs"]["sara@20M − full_ft"]
    full = by_row[("full_ft", 2)]
    for metric in ("shape", "fid_heldout"):
        assert versus_full[metric]["mean"] == pytest.approx(sara[metric]["mean"] - full[metric]["mean"])
    assert contest["sara_vs"]["sara@20M − lora@20M"]["drift"] == sara["drift_vs_lora"]
    assert "Who leads" in (out / "style_benchmark.md").read_text()

    # resuming trains and scores nothing again; --report_only writes the same report and the docs files
    trained = len(in_process_trainer)
    timings = (out / "timings.json").read_text()
    again = run(suite_module, out, tiny_clip_dir, "--methods", "lora", "sara", "full_ft", "--rates", 2)
    assert len(in_process_trainer) == trained and (out / "timings.json").read_text() == timings
    docs = tmp_path / "docs"
    only = run(suite_module, out, tiny_clip_dir, "--methods", "lora", "sara", "full_ft", "--rates", 2,
               "--report_only", "--report_dir", docs)
    assert only["aggregates"] == again["aggregates"]
    assert (docs / "results/style_benchmark_embedded.json").is_file()
    assert (docs / "images/style_benchmark_embedded_fid_vs_drift.png").is_file()


def test_an_interrupted_grid_continues_where_it_stopped(suite_module, in_process_trainer, tiny_clip_dir,
                                                        tmp_path, monkeypatch):
    out = tmp_path / "suite"
    original = suite_module.StyleSuite.score
    calls = []

    def score_then_stop(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(args)
        if len(calls) == 2:  # the base model and the first checkpoint scored, the last not
            raise KeyboardInterrupt("simulated interruption")
        return result

    with monkeypatch.context() as patch:
        patch.setattr(suite_module.StyleSuite, "score", score_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(suite_module, out, tiny_clip_dir, "--methods", "lora", "--levels", "20M", "--rates", 1,
                "--styles", "rose")
    first = len(in_process_trainer)
    scored = out / "scores/rose/seed0/lora@20M"
    assert (scored / "step1.json").is_file() and not (scored / "step2.json").exists()
    before = (scored / "step1.json").stat().st_mtime_ns
    report = run(suite_module, out, tiny_clip_dir, "--methods", "lora", "--levels", "20M", "--rates", 1,
                 "--styles", "rose")
    assert len(in_process_trainer) == first  # the trained run was not trained again
    assert (scored / "step1.json").stat().st_mtime_ns == before  # nor the scored checkpoint rescored
    assert {(r["row"], r["step"]) for r in report["rows"]} == {("base", 0), ("lora@20M", 1), ("lora@20M", 2)}


def test_sara_ablation_rows_change_one_part_of_the_recipe_and_answer_their_pairs(
        suite_module, in_process_trainer, tiny_clip_dir, tmp_path):
    """SaRA on Super-Tuning's layers, then without its low-rank loss, then also without its progressive
    step: asked for by name, budgeted like SaRA, kept out of VLHI's group and the leaders, compared in
    their pairs."""
    defaults = suite_module.parse_args(["--output_dir", str(tmp_path)])
    assert not {m.name for m in suite_module.SARA_ABLATIONS} & set(defaults.methods)
    out = tmp_path / "suite"
    report = run(suite_module, out, tiny_clip_dir, "--methods", "lora", "sara", "supertuning", "sara_attnff",
                 "sara_attnff_norank", "sara_attnff_plain", "--levels", "20M", "--rates", 1,
                 "--styles", "rose")
    budgets = report["settings"]["budgets"]
    configs = {}
    ablations = {"sara_attnff@20M", "sara_attnff_norank@20M", "sara_attnff_plain@20M"}
    for row in ("sara@20M", *ablations):
        assert budgets[row]["trainable_parameters"] == budgets[row]["target"]
        adapter = out / f"runs/rose/seed0/{row}/adapter.safetensors"
        configs[row] = difftune.adapter_file.read_adapter_file(adapter)[1]
    assert "conv_in" in configs["sara@20M"]["targets"]  # SaRA: every Linear and Conv2d
    for row in ablations:  # Super-Tuning's: the transformer blocks' Linear
        targets = configs[row]["targets"]
        assert targets and all(".transformer_blocks." in name for name in targets)
    lambda_rank = configs["sara@20M"]["config"]["lambda_rank"]
    assert configs["sara_attnff@20M"]["config"]["lambda_rank"] == lambda_rank > 0
    assert configs["sara_attnff@20M"]["extra"]["progressive_applied"]
    norank = configs["sara_attnff_norank@20M"]
    assert norank["config"]["lambda_rank"] == 0 and norank["extra"]["progressive_applied"]
    plain = configs["sara_attnff_plain@20M"]
    assert plain["config"]["lambda_rank"] == 0 and not plain["config"]["progressive_step"]
    assert not plain["extra"].get("progressive_applied")
    assert not ablations & set(report["settings"]["vlhi_group"])
    contest = report["comparisons"]
    for entry in contest["leaders"].values():
        assert not ablations & (set(entry["vs_best"]) | {entry["best"]})
    pairs = {"sara_attnff@20M − sara@20M", "sara_attnff@20M − supertuning@20M",
             "sara_attnff_norank@20M − sara_attnff@20M", "sara_attnff_plain@20M − sara_attnff_norank@20M",
             "sara_attnff_plain@20M − sara_attnff@20M", "sara_attnff_plain@20M − supertuning@20M"}
    assert pairs <= set(contest["sara_vs"])
    means = {a["row"]: a for a in report["aggregates"] if a["step"] == 2}
    for pair in pairs:
        first, second = pair.split(" − ")
        for metric in ("drift", "clip"):
            assert contest["sara_vs"][pair][metric]["mean"] == pytest.approx(
                means[first][metric]["mean"] - means[second][metric]["mean"])
    assert "sara_attnff_plain@20M − supertuning@20M" in (out / "style_benchmark.md").read_text()


def test_bad_flags_are_refused(suite_module, tmp_path):
    with pytest.raises(SystemExit):
        suite_module.parse_args(["--output_dir", str(tmp_path), "--checkpoint_steps", "2", "1"])
    with pytest.raises(SystemExit):
        suite_module.parse_args(["--output_dir", str(tmp_path), "--methods", "sara"])
    with pytest.raises(SystemExit):
        suite_module.parse_args(["--output_dir", str(tmp_path), "--styles", "nope"])


def test_a_winner_on_the_grids_edge_extends_the_sweep(suite_module, tmp_path, monkeypatch):
    """The sweep tries ×3 past the largest rate while it wins (÷3 below the smallest), at most
    --sweep_extensions times; a failed rate is not tried again; an older selection is completed."""
    import math

    args = suite_module.parse_args(["--output_dir", str(tmp_path), "--styles", "rose"])
    suite = suite_module.StyleSuite(args)
    trained = []

    def train(self, row, options, style, seed, rate, run_dir, steps, checkpointing_steps):
        trained.append(rate)
        if rate > 0.05:
            raise suite_module.DifftuneError(f"{run_dir}: the loss diverged")
        return {}

    def score(self, adapter, style, path, validation=False):  # best at 0.03, the grid's top is 0.01
        return {"fid_heldout": abs(math.log(rate_of(path) / 0.03))}

    def rate_of(path):
        return float(path.parent.name.removeprefix("lr"))

    monkeypatch.setattr(suite_module.StyleSuite, "train", train)
    monkeypatch.setattr(suite_module.StyleSuite, "score", score)

    class Bar:
        def update(self, n):
            pass

    row = suite_module.Row(suite_module.METHODS_BY_NAME["sara"], "20M")
    selection = {}
    rate = suite_module.sweep_rate(suite, row, {"sara@20M": {"options": {}}}, selection, Bar())
    assert trained == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2, 9e-2])  # 9e-2 fails; not retried
    assert rate == pytest.approx(3e-2) and selection["sara"]["extended"] == pytest.approx([3e-2, 9e-2])
    assert "sweep/sara/lr0.09" in json.loads((tmp_path / "failures.json").read_text())
    # the smallest rate winning goes down; a rate inside the grid stops it
    tried = [{"rate": r, "fid_validation": f} for r, f in ((1e-3, 1.0), (3e-3, 2.0), (1e-2, 3.0))]
    assert suite_module.rate_beyond_edge(tried, [1e-3, 3e-3, 1e-2]) == pytest.approx(1e-3 / 3)
    tried[1]["fid_validation"] = 0.5
    assert suite_module.rate_beyond_edge(tried, [1e-3, 3e-3, 1e-2]) is None
    # a selection written before the rule (no "extended") is completed, the rest reused
    trained.clear()
    old = {"sara": {"rate": 1e-2, "tried": [], "domain": "rose"}}
    rate = suite_module.sweep_rate(suite, row, {"sara@20M": {"options": {}}}, old, Bar())
    assert rate == pytest.approx(3e-2) and "extended" in old["sara"]
    assert suite_module.sweep_rate(suite, row, {}, old, Bar()) == rate  # now kept as it is


def test_a_run_trained_at_another_rate_is_refused_not_reused(suite_module, tmp_path):
    run_dir = tmp_path / "runs/rose/seed0/sara@20M"
    suite_module.check_cell_rate(run_dir, 0.01)  # nothing trained yet: nothing to refuse
    run_dir.mkdir(parents=True)
    (run_dir / suite_module.CELL_FILE).write_text(json.dumps({"learning_rate": 0.01}))
    suite_module.check_cell_rate(run_dir, 0.01)
    with pytest.raises(suite_module.DifftuneError, match=r"@20M was trained at learning rate 0.01 .*0.03:"):
        suite_module.check_cell_rate(run_dir, 0.03)


def _grid_folder(root, rows, methods, cache=b"features"):
    """A style benchmark folder as the grid leaves it: budgets, rates, a cached reference, per row a
    trained run and a scored cell on rose, timings."""
    root.mkdir(parents=True)
    (root / "budgets.json").write_text(json.dumps({row: {"trainable_parameters": 10} for row in rows}))
    (root / "sweep").mkdir()
    (root / "sweep/selection.json").write_text(json.dumps({m: {"rate": r} for m, r in methods.items()}))
    (root / "cache").mkdir()
    (root / "cache/rose_heldout.pt").write_bytes(cache)
    for row in rows:
        (root / f"runs/rose/seed0/{row}").mkdir(parents=True)
        (root / f"runs/rose/seed0/{row}/adapter.safetensors").write_bytes(row.encode())
        (root / f"scores/rose/seed0/{row}").mkdir(parents=True)
        (root / f"scores/rose/seed0/{row}/step300.json").write_text(json.dumps({"fid_heldout": len(row)}))
    (root / "timings.json").write_text(json.dumps({f"train/runs/rose/seed0/{row}": {"cpu": 1.0}
                                                   for row in rows}))
    return root


def test_folders_of_one_grid_merge_into_one(suite_module, tmp_path):
    here = _grid_folder(tmp_path / "a", ["lora@20M", "sara@20M"], {"lora": 1e-3, "sara": 3e-2})
    there = _grid_folder(tmp_path / "b", ["lora@20M", "svfit"], {"lora": 1e-3, "svfit": 0.27})
    (there / "scores/rose/seed0/lora@20M/step300.json").write_text('{"fid_heldout": -1}')  # ours is kept
    (here / "failures.json").write_text(json.dumps({"svfit/rose/seed0": "killed", "tlora/rose/seed0": "x"}))
    counts = suite_module.merge_grid(here, there)
    assert (here / "runs/rose/seed0/svfit/adapter.safetensors").read_bytes() == b"svfit"
    assert json.loads((here / "scores/rose/seed0/svfit/step300.json").read_text()) == {"fid_heldout": 5}
    assert json.loads((here / "scores/rose/seed0/lora@20M/step300.json").read_text()) == {"fid_heldout": 8}
    assert counts["copied"] == 2 and counts["kept"] == 3  # lora's run and score, the cache
    rates = json.loads((here / "sweep/selection.json").read_text())
    assert {m: e["rate"] for m, e in rates.items()} == {"lora": 1e-3, "sara": 3e-2, "svfit": 0.27}
    timings = json.loads((here / "timings.json").read_text())
    assert set(timings) == {f"train/runs/rose/seed0/{r}" for r in ("lora@20M", "sara@20M", "svfit")}
    assert json.loads((here / "failures.json").read_text()) == {"tlora/rose/seed0": "x"}  # svfit's answered
    assert set(json.loads((here / "budgets.json").read_text())) == {"lora@20M", "sara@20M", "svfit"}


def test_the_report_after_a_merge_counts_both_folders_time(suite_module, tmp_path, monkeypatch):
    """`--merge_from` writes its report from the merged folder: every cell's time, not only this one's."""
    here = _grid_folder(tmp_path / "a", ["lora@20M", "sara@20M"], {"lora": 1e-3, "sara": 3e-2})
    there = _grid_folder(tmp_path / "b", ["lora@20M", "svfit"], {"lora": 1e-3, "svfit": 0.27})
    seen = {}
    monkeypatch.setattr(suite_module, "write_report",
                        lambda suite, rows, budgets, selection: seen.update(timings=dict(suite.timings)))
    suite_module.main(["--output_dir", str(here), "--merge_from", str(there)])
    assert set(seen["timings"]) == {f"train/runs/rose/seed0/{r}" for r in ("lora@20M", "sara@20M", "svfit")}


@pytest.mark.parametrize("difference", ["rate", "budget", "cache", "not a grid"])
def test_folders_of_different_grids_are_refused_before_anything_is_copied(suite_module, tmp_path, difference):
    here = _grid_folder(tmp_path / "a", ["lora@20M"], {"lora": 1e-3})
    there = _grid_folder(tmp_path / "b", ["lora@20M", "svfit"], {"lora": 1e-3, "svfit": 0.27},
                         cache=b"other features" if difference == "cache" else b"features")
    if difference == "rate":
        (there / "sweep/selection.json").write_text(json.dumps({"lora": {"rate": 3e-3}}))
    if difference == "budget":
        (there / "budgets.json").write_text(json.dumps({"lora@20M": {"trainable_parameters": 11}}))
    if difference == "not a grid":
        (there / "budgets.json").unlink()
    message = {"rate": "lora was swept to 0.003 there and 0.001 here", "budget": "lora@20M is budgeted",
               "cache": "rose_heldout.pt differs", "not a grid": "not a style benchmark folder"}[difference]
    with pytest.raises(suite_module.DifftuneError, match=message):
        suite_module.merge_grid(here, there)
    assert not (here / "runs/rose/seed0/svfit").exists()
