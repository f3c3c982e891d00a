"""The README's commands and example are the ones that really run."""

import re
from pathlib import Path

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
