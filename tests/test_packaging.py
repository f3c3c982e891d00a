"""A plain (non-editable) install carries what the built-in names need: the wheel is built from a
copy of the source tree, installed into a folder of its own, and used from another folder."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "outputs",
    "runs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
)


def test_wheel_installs_and_loads_the_embedded_model(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=SKIP, symlinks=True)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("difftune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "difftune/assets/embedded_model/model_index.json" in names
    assert "difftune/assets/prompts/world_subject_prompts.txt" in names
    assert not any(name.startswith("assets/") for name in names)  # inside the package, not beside it

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = (
        "import difftune, json\n"
        "from difftune.model_factory import load_pipeline\n"
        "from difftune.metrics.subject import PROMPT_LISTS, VALIDATION_PROMPT_LISTS\n"
        "pipe = load_pipeline('builtin:embedded')\n"
        "lists = [*PROMPT_LISTS.values(), *VALIDATION_PROMPT_LISTS.values()]\n"
        "print(json.dumps({'file': difftune.__file__, 'unet': type(pipe.unet).__name__,\n"
        "                  'lists': all(p.is_file() for p in lists)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]


    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(target))  # the installed copy, not this checkout
    assert report["unet"] == "UNet2DConditionModel" and report["lists"]
