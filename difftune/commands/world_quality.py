"""Measure the embedded model in its world: prompt following and FID, judged by the world CLIP.

    difftune world-quality                     # assets/embedded_model, prints the table
    difftune world-quality --prompts 200 --fid_images 500 --steps 25 --guidance_scale 5

(``python eval/world_quality.py`` in a checkout is the same command.)

Writes quality.json, samples_grid.png (prompts as labels) and world_examples.png (real
held-out scenes with their captions) into the model folder.

With a one-step (HiPA) adapter it measures three generators from the same noise instead,
the adapter's one step, the base model's one step and the multi-step teacher, and prints
their table (FID, CLIP score, colour / shape accuracy, seconds per image):

    difftune world-quality --one_step_adapter outputs/one_step/adapter.safetensors \
        --prompts 300 --output_dir outputs/one_step_eval

The teacher's samples are cached in <output_dir>/teacher: an interrupted run continues
where it stopped. Writes <output_dir>/results.json, results.md and comparison.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from difftune.errors import run_main
from difftune.hipa.teacher import TeacherSettings
from difftune.io import save_image, write_text
from difftune.model_factory import EMBEDDED_MODEL_DIR
from difftune.world.quality import SamplingSettings, markdown_table, quality_report, world_examples_grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", type=Path, default=EMBEDDED_MODEL_DIR)
    parser.add_argument("--prompts", type=int,
                        help="held-out one-object captions to generate (default 200; 300 with "
                             "--one_step_adapter)")
    parser.add_argument("--fid_images", type=int, default=500, help="images per set for FID")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--output_json", type=Path, help="default: <model_dir>/quality.json")
    parser.add_argument("--grid", type=Path, help="default: <model_dir>/samples_grid.png")
    one_step = parser.add_argument_group(
        "one-step adapter", "measure a one-step adapter against the base one step and the teacher; --prompts "
        "captions for FID / CLIP score and as many one-object captions for accuracy (default 300 each)")
    one_step.add_argument("--one_step_adapter", type=Path, help="adapter file of difftune train-one-step")
    one_step.add_argument("--output_dir", type=Path, default=Path("outputs/one_step_eval"),
                          help="teacher cache, results.json, results.md, comparison.png")
    one_step.add_argument("--teacher_steps", type=int, default=TeacherSettings.num_inference_steps)
    one_step.add_argument("--teacher_guidance_scale", type=float, default=TeacherSettings.guidance_scale)
    one_step.add_argument("--batch_size", type=int, default=25, help="generation batch size")
    args = parser.parse_args(argv)
    if not (args.model_dir / "model_index.json").is_file():
        parser.error(f"--model_dir {args.model_dir}: no model_index.json there; "
                     "train one with train_scripts/pretrain_world.py")
    for flag in ("prompts", "fid_images", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be positive")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args.one_step_adapter:
        return one_step_main(args, parser)

    started = time.time()
    settings = SamplingSettings(steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
    report = quality_report(args.model_dir, args.prompts or 200, args.fid_images, settings)
    grid_path = args.grid or args.model_dir / "samples_grid.png"
    report.pop("grid").save(grid_path)
    world_examples_grid().save(args.model_dir / "world_examples.png")
    report["wall_seconds"] = round(time.time() - started, 1)
    json_path = args.output_json or args.model_dir / "quality.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    print(f"\nwrote {json_path} and {grid_path} in {report['wall_seconds']:.0f} s")


def one_step_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The three-generator table of a one-step adapter (resumable: the teacher cache)."""
    from difftune.world.one_step_quality import one_step_markdown, one_step_report

    if not args.one_step_adapter.is_file():
        parser.error(f"--one_step_adapter {args.one_step_adapter}: no such file")
    if args.batch_size < 1 or args.teacher_steps < 1:
        parser.error("--batch_size and --teacher_steps must be positive")
    started = time.time()
    teacher = TeacherSettings(num_inference_steps=args.teacher_steps,
                              guidance_scale=args.teacher_guidance_scale, seed=args.seed)
    report = one_step_report(args.one_step_adapter, args.output_dir, args.prompts or 300, teacher,
                             args.model_dir, args.batch_size)
    grid = report.pop("grid")
    report["wall_seconds"] = round(time.time() - started, 1)
    table = one_step_markdown(report)
    output = args.output_dir
    save_image(output / "comparison.png", grid)
    write_text(output / "results.md", table + "\n")
    json_path = args.output_json or output / "results.json"
    text = json.dumps(report, indent=2, default=str) + "\n"
    write_text(json_path, text)
    print(table)
    print(f"\nwrote {json_path}, {output / 'results.md'} and {output / 'comparison.png'} "
          f"in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    run_main(main)
