"""Measure the embedded model in its world: prompt following and FID, judged by the world CLIP.

    python eval/world_quality.py                      # assets/embedded_model, prints the table
    python eval/world_quality.py --prompts 200 --fid_images 500 --steps 25 --guidance_scale 5

Writes quality.json, samples_grid.png (prompts as labels) and world_examples.png (real
held-out scenes with their captions) into the model folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from difftune.errors import run_main
from difftune.model_factory import EMBEDDED_MODEL_DIR
from difftune.world.quality import SamplingSettings, markdown_table, quality_report, world_examples_grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=EMBEDDED_MODEL_DIR)
    parser.add_argument("--prompts", type=int, default=200, help="held-out one-object captions to generate")
    parser.add_argument("--fid_images", type=int, default=500, help="images per set for FID")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--output_json", type=Path, help="default: <model_dir>/quality.json")
    parser.add_argument("--grid", type=Path, help="default: <model_dir>/samples_grid.png")
    args = parser.parse_args(argv)
    if not (args.model_dir / "model_index.json").is_file():
        parser.error(f"--model_dir {args.model_dir}: no model_index.json there; "
                     "train one with train_scripts/pretrain_world.py")
    for flag in ("prompts", "fid_images", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be positive")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    started = time.time()
    settings = SamplingSettings(steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
    report = quality_report(args.model_dir, args.prompts, args.fid_images, settings)
    grid_path = args.grid or args.model_dir / "samples_grid.png"
    report.pop("grid").save(grid_path)
    world_examples_grid().save(args.model_dir / "world_examples.png")
    report["wall_seconds"] = round(time.time() - started, 1)
    json_path = args.output_json or args.model_dir / "quality.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"\nwrote {json_path} and {grid_path} in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    run_main(main)
