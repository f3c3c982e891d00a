"""Wall time of short subject-training runs on the tiny built-in models, as a table.

    python benchmarks/train_subject_speed.py --steps 50 --threads 1 2

Each row is one `python train_scripts/train_subject.py` process (imports, model build,
caching, training, saving and the final samples from a fresh pipeline all included),
run one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_scripts" / "train_subject.py"
SUMMARY = re.compile(r"(\d+) steps in ([\d.]+) s \(([\d.]+) s/step\), ([\d.]+) s in all")


def make_images(folder: Path, count: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def run(model: str, steps: int, threads: int, work: Path) -> dict[str, float]:
    out = work / f"{model.split(':')[-1]}-{threads}"
    command = [sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", model,
               "--instance_data_dir", str(work / "subject"), "--instance_prompt", "a photo of sks thing",
               "--max_train_steps", str(steps), "--seed", "0", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    match = SUMMARY.search(result.stdout)
    if match is None:
        raise RuntimeError(f"no timing line in the output of {' '.join(command)}:\n{result.stdout}")
    return {"steps": int(match.group(1)), "loop": float(match.group(2)), "per_step": float(match.group(3)),
            "in_main": float(match.group(4)), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+",
                        default=["builtin:tiny-sd", "builtin:tiny-sdxl", "builtin:tiny-sd3"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "subject")
        print("| model | threads | steps | s/step | training loop s | main() s | process wall s |")
        print("|---|---|---|---|---|---|---|")
        for model in args.models:
            for threads in args.threads:
                r = run(model, args.steps, threads, work)
                print(f"| {model} | {threads} | {r['steps']} | {r['per_step']:.3f} | {r['loop']:.1f} | "
                      f"{r['in_main']:.1f} | {r['wall']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
