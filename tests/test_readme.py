"""The README's commands and example are the ones that really run."""

import re
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(b for b in _code_blocks("bash") if b.startswith("# tests")).splitlines()[1]
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_command]


def test_setup_commands_install_pinned_torch_first():
    for block in _code_blocks("bash")[:2]:
        command = block.splitlines()[1]
        assert command.index("pip install torch==2.13.0") < command.index("pip install -e")


def test_main_command_parses_with_the_trainer_and_the_evaluation(train_subject):
    import shlex

    main_job = next(b for b in _code_blocks("bash") if b.startswith("# main job")).splitlines()[1]
    steps = {shlex.split(part)[0]: shlex.split(part)[1:] for part in main_job.split("&& python ")[1:]}
    args = train_subject.module.parse_args(steps["train_scripts/train_subject.py"])
    assert (ROOT / args.instance_data_dir).is_dir()
    assert args.adapter == "lora" and args.pretrained_model_name_or_path == "builtin:embedded"
    assert args.recipe and args.train_text_encoder, "the main job runs the measured recipe"
    assert args.seed is not None, "the main job's numbers in the README must be reproducible"
    evaluate = load_script("eval/evaluate_subject.py")
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
    """The SVFit and TLoRA sections' examples run as printed."""
    monkeypatch.chdir(tmp_path)
    examples = [b for b in _code_blocks("python") if '"svfit"' in b or '"tlora"' in b]
    assert len(examples) == 2
    for example in examples:
        exec(compile(example, "README.md", "exec"), {})
    assert (tmp_path / "outputs/svfit/adapter.safetensors").is_file()
    assert (tmp_path / "outputs/tlora/adapter.safetensors").is_file()


def _subject_section() -> str:
    start = README.index("## Subject-driven training")
    return README[start:README.index("\n## ", start + 1)]


def test_subject_training_commands_parse_with_the_script(train_subject):
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", _subject_section(), flags=re.S)
    assert len(blocks) == 4  # embedded default, SD 1.5, SDXL and FLUX.1-dev from the hub
    for block in blocks:
        command = shlex.split(block.replace("\\\n", " "), comments=True)
        script = command.index("train_scripts/train_subject.py")
        args = train_subject.module.parse_args(command[script + 1:])
        assert args.instance_data_dir and args.output_dir


def test_subject_training_flag_tables_list_every_flag(train_subject):
    from difftune.training.arguments import METHOD_GROUP_TITLE

    section = _subject_section()
    for group in train_subject.module.build_parser()._action_groups:
        if group.title == METHOD_GROUP_TITLE:
            continue
        for action in group._group_actions:
            for flag in action.option_strings:
                if flag.startswith("--") and not flag.startswith("--no-") and flag != "--help":
                    assert f"`{flag}`" in section, f"{flag} is missing from the README's flag tables"
