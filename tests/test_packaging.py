"""A plain (non-editable) install carries what the built-in names need and the console command: the
wheel is built from a copy of the source tree, installed into a folder of its own, and used from another
folder, where the README's main job runs through ``difftune train-subject`` (a few steps) and
``difftune evaluate``."""

import json
import math
import os
import re
import shlex
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

    # the main job without the checkout: the README's two commands through the console command, the
    # shipped subject by its built-in name, cut to a few steps and images
    train, evaluate = main_job_commands()
    command = target / "bin" / "difftune"
    assert command.is_file(), "the wheel installs no difftune command"
    few_steps = ["--max_train_steps", "3", "--num_class_images", "2", "--class_inference_steps", "2",
                 "--num_validation_images", "1", "--validation_inference_steps", "2"]
    trained = subprocess.run([str(command), "train-subject", *train, *few_steps], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "recipe for builtin:embedded + lora" in trained.stdout  # the shipped recipe, from the wheel
    output = elsewhere / "outputs" / "subject"
    assert (output / "adapter.safetensors").is_file() and (output / "samples.png").is_file()
    assert json.loads((output / "train_summary.json").read_text())["steps"] == 3
    few_images = ["--num_prompts", "2", "--images_per_prompt", "1", "--num_inference_steps", "2"]
    evaluated = subprocess.run([str(command), "evaluate", *evaluate, *few_images], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((output / "eval" / "results.json").read_text())}
    assert set(results) == {"base", "lora"}
    for result in results.values():
        assert all(math.isfinite(result[key]) for key in ("clip_i", "clip_t", "class_clip_t"))
    assert results["lora"]["generated_images"] == results["base"]["generated_images"] == 2


def main_job_commands() -> tuple[list[str], list[str]]:
    """The flags of the README's main job (trainer, evaluation), the heart subject as builtin:heart."""
    block = re.search(r"```bash\n(# main job\n.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    lines = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    train, evaluate = (line[2:] for line in lines if line)
    replaced = [["builtin:heart" if flag == "assets/subjects/heart" else flag for flag in flags]
                for flags in (train, evaluate)]
    assert all("builtin:heart" in flags for flags in replaced), "the main job's subject moved"
    return replaced[0], replaced[1]

