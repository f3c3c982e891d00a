"""Bad input to a script ends with one line naming the flag or file, exit status 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from difftune.errors import AdapterFileError, run_main

ROOT = Path(__file__).resolve().parents[2]


def test_run_main_turns_bad_input_into_an_argparse_style_error(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/train_x.py", "--flag"])

    def bad_input():
        raise AdapterFileError("--adapter model.ckpt: pickle files are refused")

    with pytest.raises(SystemExit) as exit_info:
        run_main(bad_input)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "train_x.py: error: --adapter model.ckpt: pickle files are refused\n"

    def bug():
        raise RuntimeError("not the user's fault")

    with pytest.raises(RuntimeError, match="not the user's fault"):  # a bug keeps its traceback
        run_main(bug)


BAD_INPUT = [
    ("eval/evaluate_subject.py",
     ["--adapter", "missing.safetensors", "--instance_data_dir", "assets/subjects/star"],
     "evaluate_subject.py: error: --adapter missing.safetensors: missing.safetensors does not exist"),
    ("train_scripts/train_subject.py",
     ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--instance_data_dir", "no_such_folder",
      "--instance_prompt", "a sks dog"],
     "train_subject.py: error: --instance_data_dir no_such_folder: no such folder"),
]


@pytest.mark.parametrize("script,flags,message", BAD_INPUT)
def test_scripts_report_bad_input_without_a_traceback(script, flags, message, tmp_path):
    command = [sys.executable, str(ROOT / script), *flags, "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == message


def test_every_script_entry_point_goes_through_run_main():
    scripts = [*ROOT.glob("train_scripts/*.py"), *ROOT.glob("eval/*.py")]
    with_main = [p for p in scripts if 'if __name__ == "__main__":' in p.read_text()]
    assert len(with_main) >= 7
    for path in with_main:
        assert path.read_text().rstrip().endswith("run_main(main)"), path.name
