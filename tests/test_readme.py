"""The README's and docs' commands and examples are the ones that really run, and their links resolve."""

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import command_module

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
TRAINING = (DOCS / "training.md").read_text()
README_MAX_LINES = 250


def _code_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """The shell commands of a block, one per logical line (backslash continuations joined)."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def _script_args(command: list[str], script: str) -> list[str]:
    return command[command.index(script) + 1:]


def test_ci_runs_the_readme_test_command():
    test_command = next(b for b in _code_blocks("bash") if b.startswith("# tests")).splitlines()[1]
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]


def test_setup_commands_install_pinned_torch_first():
    installs = [b for b in _code_blocks("bash") if "pip install" in b]
    assert [b.splitlines()[0] for b in installs] == ["# set up", "# tests (offline)"]
    for block in installs:
        assert len(block.splitlines()) == 2, "the set-up and test commands are one line each"
        command = block.splitlines()[1]
        assert command.index("pip install torch==2.13.0") < command.index("pip install -e")
    set_up, tests = (b.splitlines()[1] for b in installs)
    # the test command is the set-up command with the test extra, then pytest
    assert set_up.endswith("pip install -e .")
    assert tests.startswith(set_up.removesuffix(" .") + ' ".[test]" && ')


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= README_MAX_LINES
    main_job = next(b for b in _code_blocks("bash") if b.startswith("# main job"))
    longest = max(len(line) for line in main_job.splitlines())
    assert longest <= 100, "the main job is wrapped into readable lines"


def test_main_command_parses_with_the_trainer_and_the_evaluation(train_subject):
    main_job = next(b for b in _code_blocks("bash") if b.startswith("# main job"))
    commands = _commands(main_job)
    assert [c[0] for c in commands] == ["python", "python"]
    steps = {command[1]: command[2:] for command in commands}
    args = train_subject.module.parse_args(steps["train_scripts/train_subject.py"])
    assert (ROOT / args.instance_data_dir).is_dir()
    assert args.adapter == "lora" and args.pretrained_model_name_or_path == "builtin:embedded"
    assert args.recipe and args.train_text_encoder, "the main job runs the measured recipe"
    assert args.seed is not None, "the main job's numbers in the README must be reproducible"
    evaluate = command_module("evaluate_subject")
    eval_args = evaluate.parse_args(steps["eval/evaluate_subject.py"])
    # the evaluation reads the adapter the training writes
    assert any(a.endswith(str(Path(args.output_dir) / "adapter.safetensors")) for a in eval_args.adapter)


def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = _code_blocks("python")[0]
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    image = namespace["image"]
    assert image.size == (64, 64)
    assert (tmp_path / "outputs/example/adapter.safetensors").is_file()


def test_method_examples_run(tmp_path, monkeypatch):
    """The SVFit and TLoRA pages' examples run as printed."""
    monkeypatch.chdir(tmp_path)
    examples = [(page, b) for page in ("svfit", "tlora")
                for b in _code_blocks("python", (DOCS / "methods" / f"{page}.md").read_text())
                if f'"{page}"' in b]
    assert len(examples) == 2
    for page, example in examples:
        exec(compile(example, f"docs/methods/{page}.md", "exec"), {})
    assert (tmp_path / "outputs/svfit/adapter.safetensors").is_file()
    assert (tmp_path / "outputs/tlora/adapter.safetensors").is_file()


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    return text[start:text.index("\n## ", start + 1)]


def _subject_section() -> str:
    return _section(TRAINING, "## Subject-driven training")


def _markdown_table(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with ``header_start``."""
    lines = text[text.index(header_start):].splitlines()
    rows = lines[2:next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _readme_families() -> dict[str, list[str]]:
    """The README's families table by family name (the first column's `name`)."""
    rows = _markdown_table(README, "| family | pipeline |")
    return {re.match(r"`([^`]+)`", row[0])[1]: row for row in rows}


def test_readme_families_table_is_the_registry():
    """One row per registered family, its pipeline classes, HiPA and export formats as the family says."""
    from difftune.errors import DifftuneError
    from difftune.families import EXPORT_FORMATS, FAMILIES, check_export_format

    table = _readme_families()
    assert list(table) == [name for name in table if name in FAMILIES] and set(table) == set(FAMILIES)
    for name, (_, pipelines, hub_id, trains, hipa, formats) in table.items():
        family = FAMILIES[name]
        assert pipelines == ", ".join(f"`{c}`" for c in family.pipeline_classes), name
        assert re.fullmatch(r"`[\w.-]+/[\w.-]+`", hub_id), name
        assert hipa == ("yes" if family.one_step else "no"), name
        assert trains.startswith("every method") and ("text encoder" in trains) == bool(
            family.trainable_text_encoders), name
        written = []
        for fmt in EXPORT_FORMATS:
            try:
                check_export_format(family, fmt)
                written.append(fmt)
            except DifftuneError:
                pass
        assert formats == ", ".join(written), name


@pytest.fixture
def gpu_machine(monkeypatch):
    """The documented hub commands are for a CUDA machine with bitsandbytes: parse them as there (no model
    loads, nothing runs on a GPU)."""
    import importlib.machinery
    import importlib.util

    import torch

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: importlib.machinery.ModuleSpec(
        name, None) if name == "bitsandbytes" else find_spec(name, *rest))


def _memory_table_total(model: str, configuration: str) -> str:
    """docs/memory.md's estimated total of one configuration row under the ``### <model>`` heading."""
    memory = (DOCS / "memory.md").read_text()
    section = memory[memory.index(f"### {model}\n"):]
    rows = {row[0]: row[-1] for row in _markdown_table(section, "| configuration |")}
    return rows[configuration]


def test_subject_training_commands_parse_with_the_script(train_subject, gpu_machine):
    """Every command of the subject section parses with the trainer's parser, with the flags of its
    model's family (the README's families table says which family a hub id is); a command's stated
    memory is docs/memory.md's estimate for its configuration."""
    from difftune.families import check_flags, get_family

    family_of_hub_id = {row[2].strip("`"): name for name, row in _readme_families().items()}
    blocks = re.findall(r"```bash\n(.*?)```", _subject_section(), flags=re.S)
    # the embedded default; SD 1.5, SDXL, FLUX.1-dev, FLUX.2 dev, FLUX.2 klein, Qwen-Image, Z-Image
    assert len(blocks) == 8
    families = []
    for block in blocks:
        command = shlex.split(block.replace("\\\n", " "), comments=True)
        script = command.index("train_scripts/train_subject.py")
        args = train_subject.module.parse_args(command[script + 1:])
        assert args.instance_data_dir and args.output_dir
        model = args.pretrained_model_name_or_path
        if model.startswith("builtin:"):
            continue
        family = get_family(family_of_hub_id[model])
        check_flags(family, vars(args))
        families.append(family.name)
        stated = re.search(r'memory \(estimate, docs/memory\.md\): (.+?), "(.+?)": ([\d.]+ GiB)', block)
        if family.name in ("flux2", "flux2-klein", "qwen-image", "z-image"):
            assert stated, f"the {family.title} command states its estimated memory"
            assert _memory_table_total(stated[1], stated[2]) == stated[3]
            assert args.resolution == 1024 and args.gradient_checkpointing and args.mixed_precision == "bf16"
            assert args.free_text_encoder and args.offload
            assert (args.quantize_base == "4bit") == ("4-bit base" in stated[2])
    assert families == ["sd", "sdxl", "flux", "flux2", "flux2-klein", "qwen-image", "z-image"]


def test_subject_training_flag_tables_list_every_flag(train_subject):
    section = _section(TRAINING, "## Flags of train_subject.py")
    for group in train_subject.module.build_parser()._action_groups:  # the method options too
        for action in group._group_actions:
            for flag in action.option_strings:
                if flag.startswith("--") and not flag.startswith("--no-") and flag != "--help":
                    assert f"`{flag}`" in section, f"{flag} is missing from docs/training.md's flag tables"


def test_training_flag_tables_are_the_generated_ones():
    """Editing a flag without `python -m difftune.training.flag_docs docs/training.md` fails here."""
    from difftune.training.flag_docs import SECTION, render_page

    assert [m["script"] for m in SECTION.finditer(TRAINING)] == ["train_scripts/train_subject.py",
                                                                 "train_scripts/train_one_step.py",
                                                                 "train_scripts/train_text_to_image.py"]
    assert render_page(TRAINING, ROOT) == TRAINING, \
        "docs/training.md is stale: run python -m difftune.training.flag_docs docs/training.md"


def test_dataset_training_commands_parse_with_the_script(train_text_to_image):
    """The dataset trainer's commands in docs/training.md (and the README's, if it shows one) parse
    (presets applied)."""
    blocks = re.findall(r"```bash\n(.*?)```", _section(TRAINING, "## Dataset training"), flags=re.S)
    assert len(blocks) == 3
    blocks += [b for b in _code_blocks("bash") if "train-text-to-image" in b]
    for block in blocks:
        (command,) = _commands(block)
        script_args = _script_args(command, "train-text-to-image")
        args = train_text_to_image.module.parse_args(script_args)
        assert (args.train_data_dir or args.dataset_name) and args.output_dir
        assert args.pretrained_model_name_or_path


def test_dataset_training_flag_tables_list_every_flag(train_text_to_image):
    section = TRAINING[TRAINING.index("## Flags of train_text_to_image.py"):]
    for action in train_text_to_image.module.build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-") and flag != "--help":
                assert f"`{flag}`" in section, f"{flag} is missing from docs/training.md's flag tables"


def test_readme_trainer_example_parses(train_subject):
    (block,) = [b for b in _code_blocks("bash") if "train_subject.py" in b and not b.startswith("# main job")]
    (command,) = _commands(block)
    args = train_subject.module.parse_args(_script_args(command, "train_scripts/train_subject.py"))
    assert args.with_prior_preservation and args.class_prompt and args.adapter == "lora"


def _relative_links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code is not a link
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    assert len(pages) > 10
    for page in pages:
        for link in _relative_links(page.read_text()):
            assert (page.parent / link).exists(), f"{page.relative_to(ROOT)} links to missing {link}"
    assert all((ROOT / link).exists() for link in _relative_links(README))


def test_readme_links_every_docs_page():
    linked = {(ROOT / link).resolve() for link in _relative_links(README)}
    for page in DOCS.glob("*.md"):
        assert page.resolve() in linked or page.name == "export_error_embedded.md", \
            f"docs/{page.name} is not reachable from the README"


def test_tlora_is_named_and_told_apart_from_t_lora():
    tlora_row = next(line for line in README.splitlines() if line.startswith("| `tlora` |"))
    assert "transformed tensor LoRA" in tlora_row
    page = (DOCS / "methods" / "tlora.md").read_text()
    assert "transformed tensor LoRA" in page.splitlines()[0]
    for text in (README, page):
        assert "T-LoRA (timestep-dependent LoRA" in text and "2507.05964" in text


def test_readme_stacking_numbers_are_the_measured_ones():
    """The README's stacking sentence quotes docs/results/adapter_stacking.json (adapter_stacking.py)."""
    report = json.loads((DOCS / "results/adapter_stacking.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    lora_on_lora, lora_on_sara = rows["style lora 1 + subject lora 1"], rows["style sara 1 + subject lora 1"]
    quoted = (f"a LoRA style erases a LoRA subject (CLIP-I {lora_on_lora['subject_clip_i']:.3f}, alone "
              f"{rows['subject lora']['subject_clip_i']:.3f}); a SaRA style keeps it "
              f"({lora_on_sara['subject_clip_i']:.3f}) but fades (FID {lora_on_sara['style_fid']:.1f}, alone "
              f"{rows['style sara']['style_fid']:.1f}).")
    assert quoted in " ".join(README.split())
    # what the sentence says of them: the subject lost on the LoRA style, kept on the SaRA one
    assert lora_on_lora["clip_i_change_interval"][1] < 0 < lora_on_sara["clip_i_change_interval"][1]
    assert lora_on_sara["fid_change_interval"][0] > 0


def test_readme_style_benchmark_summary_is_the_measured_one():
    """The README's style-benchmark paragraph quotes docs/results/style_benchmark_embedded.json, and what
    it calls significant, or not told apart, is what the paired 95 % intervals there say."""
    report = json.loads((DOCS / "results/style_benchmark_embedded.json").read_text())
    last = {a["row"]: a for a in report["aggregates"] if a["step"] == report["settings"]["max_train_steps"]}
    contest = report["comparisons"]
    fid, drift = contest["leaders"]["fid_heldout"], contest["leaders"]["drift"]
    sara = contest["sara_vs"]

    def interval(stat: dict, digits: int = 1) -> str:
        return f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"

    def mean(row: str, metric: str, digits: int) -> str:
        return f"{last[row][metric]['mean']:.{digits}f}"

    quoted = (
        f"**full fine-tuning wins FID** ({interval(last['full_ft']['fid_heldout'])}); Super-Tuning "
        f"({mean('supertuning@20M', 'fid_heldout', 1)}), LoKr, SVFit and TLoRA are not told apart from it, "
        f"LoRA ({mean('lora@20M', 'fid_heldout', 1)}) is {interval(fid['vs_best']['lora@20M'])} behind. "
        f"**DoRA and LoRA forget least** (drift {mean('dora@20M', 'drift', 3)} and "
        f"{mean('lora@20M', 'drift', 3)}, "
        "not told apart; every other row moves the model significantly more). **SaRA at 20M is significantly "
        f"behind** LoRA (FID +{interval(sara['sara@20M − lora@20M']['fid_heldout'])}), full fine-tuning "
        f"(+{interval(sara['sara@20M − full_ft']['fid_heldout'])}) and Super-Tuning "
        f"(+{interval(sara['sara@20M − supertuning@20M']['fid_heldout'])}), and forgets as much as full "
        f"fine-tuning (drift {mean('sara@20M', 'drift', 3)} against {mean('full_ft', 'drift', 3)})"
    )
    assert quoted in " ".join(README.split())
    # the words against the intervals
    assert fid["best"] == "full_ft"
    assert set(fid["not_told_apart"]) == {"supertuning@20M", "lokr", "svfit", "tlora"}
    assert fid["vs_best"]["lora@20M"]["low"] > 0
    assert drift["best"] == "dora@20M" and drift["not_told_apart"] == ["lora@20M"]
    others = [row for row in contest["group"] if row not in ("lora@20M", "dora@20M")]
    assert others and all(last[row]["drift_vs_lora"]["low"] > 0 for row in others)  # more than both
    assert all(sara[f"sara@20M − {row}"]["fid_heldout"]["low"] > 0
               for row in ("lora@20M", "full_ft", "supertuning@20M"))
    same_drift = sara["sara@20M − full_ft"]["drift"]
    assert same_drift["low"] < 0 < same_drift["high"]
    ablation = (f"Without it SaRA on Super-Tuning's layers is significantly ahead of LoRA (FID "
                f"{mean('sara_attnff_norank@20M', 'fid_heldout', 1)}; "
                f"{mean('sara_attnff_plain@20M', 'fid_heldout', 1)} also without the progressive step, "
                f"Super-Tuning's {mean('supertuning@20M', 'fid_heldout', 1)}); with it, it barely learns "
                f"({mean('sara_attnff@20M', 'fid_heldout', 1)}).")
    assert ablation in " ".join(README.split())
    assert all(last[f"{row}@20M"]["fid_heldout_vs_lora"]["high"] < 0
               for row in ("sara_attnff_norank", "sara_attnff_plain"))
    assert sara["sara_attnff_norank@20M − sara_attnff@20M"]["fid_heldout"]["high"] < 0  # the loss's cost
    cpu = report["settings"]["timings_seconds"]
    assert f"The grid took {(cpu['traincpu'] + cpu['scorecpu']) / 3600:.1f} CPU-hours." in README


def test_readme_subject_rerun_sentence_is_the_measured_one():
    """The README's re-run sentence: every mean of docs/results/benchmark_embedded_rerun.json inside the
    first run's interval (benchmark_embedded.json), and the CPU-hours its timings recorded (plus at most
    the earlier parts of the few trainings resumed after a stop, which the timings lack)."""
    first, rerun = (json.loads((DOCS / f"results/{name}.json").read_text())
                    for name in ("benchmark_embedded", "benchmark_embedded_rerun"))

    def means(report: dict) -> dict:
        return {(a["method"], a["step"], a["metric"]): a["mean"] for a in report["aggregates"]}

    before, after = means(first), means(rerun)
    assert set(before) == set(after) and len(after) == 75
    assert all(before[key]["low"] <= after[key]["mean"] <= before[key]["high"] for key in before)
    sentence = r"with today's code, every mean lands inside these intervals; it took ([\d.]+) CPU-hours"
    said = re.search(sentence, " ".join(README.split()))
    assert said, "the README's re-run sentence"
    recorded = (rerun["timing"]["train_cpu_s"] + rerun["timing"]["score_cpu_s"]) / 3600
    assert round(float(said.group(1)) * 10) - round(recorded * 10) in (0, 1)  # in tenths of an hour
