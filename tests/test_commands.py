"""The ``difftune`` command: one entry point whose subcommands are the modules of difftune/commands/,
the checkout's scripts as thin wrappers of the same modules, and `accelerate launch -m` of both."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT as ROOT_TEXT
from conftest import make_subject_images

import difftune
from difftune.commands import COMMANDS, main

ROOT = Path(ROOT_TEXT)
COMMANDS_DIR = ROOT / "difftune" / "commands"
# modules of difftune/commands/ that are parts of a command, not commands
PARTS = {"__init__", "benchmark_runs", "benchmark_suite"}
WRAPPERS = {"train_scripts/train_subject.py": "train-subject",
            "train_scripts/train_one_step.py": "train-one-step", "eval/evaluate_subject.py": "evaluate",
            "eval/world_quality.py": "world-quality", "eval/benchmark.py": "benchmark"}


def test_the_console_command_is_the_dispatcher():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"difftune": "difftune.commands:main"}


def test_every_command_module_is_a_subcommand_with_a_main():
    listed = {module for module, _ in COMMANDS.values()}
    for path in sorted(COMMANDS_DIR.glob("*.py")):
        if path.stem not in PARTS:
            assert f"difftune.commands.{path.stem}" in listed, f"{path.name} is no subcommand of difftune"
    for name, (module, summary) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
        assert summary and name == name.lower() and " " not in name


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name}" in out and summary in out
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"difftune {difftune.__version__}"


def test_a_subcommand_gets_its_flags_and_its_name_and_bad_input_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/difftune"])
    with pytest.raises(SystemExit) as exit_info:
        main(["train-subject", "--instance_data_dir", "builtin:nothing", "--instance_prompt", "a sks x"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[0].startswith("usage: difftune train-subject ")
    assert error[-1].startswith("difftune train-subject: error: argument --instance_data_dir: "
                                "builtin:nothing is not a built-in subject")
    assert sys.argv == ["/somewhere/bin/difftune"], "the command line is given back"
    with pytest.raises(SystemExit) as exit_info:
        main(["train-subjects"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("difftune: error: unknown command 'train-subjects'")


@pytest.mark.parametrize(("script", "command"), sorted(WRAPPERS.items()))
def test_the_checkout_scripts_run_the_command_modules(script, command):
    """A wrapper imports its command's main and runs it: nothing else of a command lives there."""
    tree = ast.parse((ROOT / script).read_text())
    first = next(node for node in tree.body if isinstance(node, ast.ImportFrom))
    module = COMMANDS[command][0]
    assert first.module == module and "main" in [alias.name for alias in first.names]
    defined = [node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert not defined, f"{script} defines {defined}: the command's code belongs in {module}"


def test_python_m_difftune_runs_a_command():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "difftune", "export", "--help"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--format" in result.stdout


def test_accelerate_launch_runs_the_command_module(tmp_path):
    """``accelerate launch -m difftune train-subject`` trains (one process on the CPU, two steps)."""
    subject = make_subject_images(tmp_path / "subject")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines",
              "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "difftune", "train-subject"]
    flags = ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", str(subject),
             "--instance_prompt", "a photo of sks disc", "--max_train_steps", "2", "--report_to", "none",
             "--skip_final_inference", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run([*launch, *flags], capture_output=True, text=True, env=env, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "difftune subject training | builtin:tiny-sd" in result.stdout
    assert (tmp_path / "out" / "adapter.safetensors").is_file()
