"""Stacking a style and a subject on the embedded model, measured.

A style adapter (a style domain of the world, trained with the dataset trainer) and the heart subject
of the main job (trained with the subject trainer's embedded recipe), each with LoRA and with SaRA:

- each alone, both stacked at several weights (`difftune.set_adapters`), and the subject trained on top
  of the frozen style (``--base_adapter``);
- subject CLIP-I: world-CLIP image similarity of "<style> style, a sks red heart ..." images to the
  subject's own images;
- style FID: world-CLIP FID of "<style> style, <held-out world caption>" images to the style's real
  held-out images, beside the floor (a second real set at the same count).

    python benchmarks/adapter_stacking.py --output_dir outputs/stacking --docs

Trained adapters are kept in ``--output_dir`` and reused on a rerun; ``--docs`` writes
docs/adapter-stacking.md's table, docs/images/adapter_stacking_grid.png and
docs/results/adapter_stacking.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SUBJECT_DIR = ROOT / "assets" / "subjects" / "heart"
DOCS = ROOT / "docs"
ADAPTER = "adapter.safetensors"


def run(command: list[str], log: Path) -> float:
    """One trainer run in its own process (its output in ``log``); returns its seconds."""
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run([sys.executable, "-m", *command], stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:1])} failed; see {log}")
    return time.perf_counter() - started


def train_style(method: str, folder: Path, out: Path, args: argparse.Namespace) -> float | None:
    if (out / ADAPTER).is_file():
        return None
    options = ["--rank", "16"] if method == "lora" else ["--sara_budget", "0.1"]
    return run(["difftune.commands.train_text_to_image",
                "--pretrained_model_name_or_path", "builtin:embedded", "--train_data_dir", str(folder),
                "--adapter", method, "--targets", "all", *options,
                "--max_train_steps", str(args.style_steps), "--train_batch_size", str(args.style_batch),
                "--learning_rate", "1e-3", "--seed", "0", "--output_dir", str(out), "--skip_final_inference",
                "--report_to", "none"], out.with_suffix(".log"))


def train_subject(method: str, out: Path, base: Path | None = None) -> float | None:
    """The main job's command (the embedded recipe fills the rest), on top of ``base`` when given."""
    if (out / ADAPTER).is_file():
        return None
    extra = ["--base_adapter", str(base / ADAPTER)] if base else []
    return run(["difftune.commands.train_subject", "--pretrained_model_name_or_path", "builtin:embedded",
                "--instance_data_dir", str(SUBJECT_DIR), "--instance_prompt", "a large sks red heart",
                "--adapter", method, "--seed", "0", "--output_dir", str(out),
                "--class_data_dir", str(out.with_name(out.name + "_class")), "--skip_final_inference",
                "--report_to", "none", *extra], out.with_suffix(".log"))


def configurations(out: Path, methods: list[str], weights: list[tuple[float, float]]
                   ) -> list[dict[str, Any]]:
    """Every evaluated model: name, its adapters as (file, weight), and what it is."""
    def style(m: str) -> Path:
        return out / f"style_{m}" / ADAPTER

    rows: list[dict[str, Any]] = [{"name": "base", "adapters": [], "style": None, "subject": None}]
    for m in methods:
        rows.append({"name": f"style {m}", "adapters": [(out / f"style_{m}" / ADAPTER, 1.0)],
                     "style": (m, 1.0), "subject": None})
    for m in methods:
        rows.append({"name": f"subject {m}", "adapters": [(out / f"subject_{m}" / ADAPTER, 1.0)],
                     "style": None, "subject": (m, 1.0)})
    for s in methods:
        for j in methods:
            for ws, wj in weights:
                rows.append({"name": f"style {s} {ws:g} + subject {j} {wj:g}",
                             "adapters": [(style(s), ws), (out / f"subject_{j}" / ADAPTER, wj)],
                             "style": (s, ws), "subject": (j, wj)})
            rows.append({"name": f"subject {j} trained on style {s}",
                         "adapters": [(style(s), 1.0), (out / f"ontop_{s}_{j}" / ADAPTER, 1.0)],
                         "style": (s, 1.0), "subject": (j, 1.0), "on_top": True})
    return rows


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import difftune
    from difftune.metrics.cli import EMBEDDED_CLIP
    from difftune.metrics.features import extract_features
    from difftune.metrics.fid import fid_from_features, load_feature_extractor
    from difftune.metrics.similarity import ClipSimilarity, mean_pairwise_cosine
    from difftune.metrics.subject import PROMPT_LISTS, Subject, load_prompts
    from difftune.model_factory import load_pipeline
    from difftune.world.quality import SamplingSettings, generate
    from difftune.world.styles import caption_prefix, render_part, style_dataset

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    folder = style_dataset(args.style, "train", out / "style_data")
    for m in args.methods:
        took = train_style(m, folder, out / f"style_{m}", args)
        if took:
            seconds[f"style_{m}"] = round(took, 1)
        took = train_subject(m, out / f"subject_{m}")
        if took:
            seconds[f"subject_{m}"] = round(took, 1)
    for s in args.methods:
        for j in args.methods:
            took = train_subject(j, out / f"ontop_{s}_{j}", base=out / f"style_{s}")
            if took:
                seconds[f"ontop_{s}_{j}"] = round(took, 1)

    prefix = caption_prefix(args.style)
    subject = Subject.from_dir(SUBJECT_DIR)
    subject_prompts = [prefix + p for p in load_prompts(PROMPT_LISTS["world"], subject.identifier,
                                                        subject.class_name, args.subject_prompts)]
    subject_prompts = [p for p in subject_prompts for _ in range(args.images_per_prompt)]
    real, captions = render_part(args.style, "heldout", args.real_images)
    reference, _ = render_part(args.style, "reference", args.fid_images)
    style_prompts = captions[:args.fid_images]
    extractor = load_feature_extractor(f"clip:{EMBEDDED_CLIP}")
    clip = ClipSimilarity.from_pretrained(str(EMBEDDED_CLIP))

    def features(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        pixels = (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
                  if isinstance(images, np.ndarray) else ((images + 1) / 2).clamp(0, 1))
        return extract_features(extractor, pixels, 100)

    real_features = features(real)
    floor = fid_from_features(real_features, features(reference), extractor, kid=False).fid
    subject_reference = clip.image_embeddings(subject.images)
    pipe = load_pipeline("builtin:embedded", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sampling = SamplingSettings(steps=args.steps, guidance_scale=5.0, batch_size=args.fid_images)
    rows, examples = [], {}
    for config in configurations(out, args.methods, args.weights):
        if difftune.list_adapters(pipe):
            difftune.remove_adapter(pipe)
        for index, (path, weight) in enumerate(config["adapters"]):
            difftune.load_adapter(pipe, path, scale=weight, adapter_name=f"part_{index}")
        begun = time.perf_counter()
        subject_images = generate(pipe, subject_prompts, sampling)
        style_images = generate(pipe, style_prompts, sampling)
        clip_i = mean_pairwise_cosine(clip.image_embeddings(to_pil(subject_images)), subject_reference)
        fid = fid_from_features(real_features, features(style_images), extractor, kid=False).fid
        row = {key: config.get(key) for key in ("name", "style", "subject", "on_top")}
        row.update({"subject_clip_i": round(clip_i, 4), "style_fid": round(fid, 2),
                    "seconds": round(time.perf_counter() - begun, 1)})
        rows.append(row)
        examples[config["name"]] = (to_pil(subject_images[:3]), to_pil(style_images[:3]))
        print(f"{config['name']:<40} subject CLIP-I {clip_i:.3f}  style FID {fid:.1f}", flush=True)
    return {
        "style": args.style, "methods": args.methods, "rows": rows, "style_fid_floor": round(floor, 2),
        "subject_ceiling_clip_i": 0.765, "training_seconds": seconds,
        "settings": {"subject_prompts": args.subject_prompts, "images_per_prompt": args.images_per_prompt,
                     "fid_images": args.fid_images, "real_images": args.real_images, "steps": args.steps,
                     "guidance_scale": 5.0, "style_steps": args.style_steps, "style_batch": args.style_batch,
                     "weights": args.weights},
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "examples": examples,
    }


def grid(report: dict[str, Any], names: list[str]) -> Image.Image:
    """One row per model: three subject images, then three style images (each 64 px, doubled)."""
    from PIL import ImageDraw

    size, label = 128, 300
    canvas = Image.new("RGB", (label + 6 * size + 8, len(names) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        subject_images, style_images = report["examples"][name]
        draw.text((4, row * size + size // 2 - 6), name, fill="black")
        for col, image in enumerate([*subject_images, *style_images]):
            x = label + col * size + (8 if col >= 3 else 0)
            canvas.paste(image.resize((size, size), Image.NEAREST), (x, row * size))
    return canvas


def markdown(report: dict[str, Any]) -> str:
    lines = ["| model | subject CLIP-I ↑ | style FID ↓ |", "|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['name']} | {row['subject_clip_i']:.3f} | {row['style_fid']:.1f} |")
    lines.append(f"| *real style images (FID floor) / subject images (CLIP-I ceiling)* | "
                 f"{report['subject_ceiling_clip_i']:.3f} | {report['style_fid_floor']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/stacking"))
    parser.add_argument("--style", default="hills", help="style domain of the world")
    parser.add_argument("--methods", nargs="+", default=["lora", "sara"])
    parser.add_argument("--weights", nargs="+", default=["1,1", "0.5,1", "1,0.5"],
                        help="style,subject weights of the stacked models")
    parser.add_argument("--style_steps", type=int, default=300)
    parser.add_argument("--style_batch", type=int, default=4)
    parser.add_argument("--subject_prompts", type=int, default=8)
    parser.add_argument("--images_per_prompt", type=int, default=2)
    parser.add_argument("--fid_images", type=int, default=48)
    parser.add_argument("--real_images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--docs", action="store_true", help="write the table, grid and JSON into docs/")
    args = parser.parse_args(argv)
    args.weights = [tuple(float(w) for w in pair.split(",")) for pair in args.weights]
    torch.set_num_threads(args.num_threads)
    report = measure(args)
    table = markdown(report)
    print(table)
    examples = report.pop("examples")
    (args.output_dir / "report.json").write_text(json.dumps(report, indent=2))
    if args.docs:
        shown = [row["name"] for row in report["rows"] if "+" not in row["name"]
                 or (row["style"][1] == 1.0 and row["subject"][1] == 1.0)]
        grid({"examples": examples}, shown).save(DOCS / "images" / "adapter_stacking_grid.png")
        (DOCS / "results").mkdir(exist_ok=True)
        (DOCS / "results" / "adapter_stacking.json").write_text(json.dumps(report, indent=2) + "\n")
        print("docs: docs/images/adapter_stacking_grid.png, docs/results/adapter_stacking.json")


if __name__ == "__main__":
    main()
