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

Each number comes with a 95% bootstrap interval: CLIP-I resampled over the subject prompts, FID
over the generated images (bias-corrected, `bootstrap_grouped`); the FID floor at the same count
and the CLIP-I ceiling (the subject's images among themselves) are the references.

Trained adapters are kept in ``--output_dir`` and reused on a rerun; the table is printed (it is
docs/adapter-stacking.md's, which a test holds to the JSON) and ``--docs`` writes
docs/images/adapter_stacking_grid.png and docs/results/adapter_stacking.json.
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
REAL = "real: subject images / style images"


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


def train_subject(method: str, out: Path, args: argparse.Namespace, base: Path | None = None) -> float | None:
    """The main job's command (the embedded recipe fills the rest), on top of ``base`` when given.

    The prior-preservation class images come from the model being tuned (the base, or the base with
    the style), so the runs on the same model share their folder: the second reuses the first's.
    """
    if (out / ADAPTER).is_file():
        return None
    extra = ["--base_adapter", str(base / ADAPTER)] if base else []
    if args.subject_steps:
        extra += ["--max_train_steps", str(args.subject_steps)]
    if args.class_images:
        extra += ["--num_class_images", str(args.class_images)]
    return run(["difftune.commands.train_subject", "--pretrained_model_name_or_path", "builtin:embedded",
                "--instance_data_dir", str(SUBJECT_DIR), "--instance_prompt", "a large sks red heart",
                "--adapter", method, "--seed", "0", "--output_dir", str(out),
                "--class_data_dir", str(out.parent / f"class_{base.name if base else 'base'}"),
                "--skip_final_inference",
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


def compared_with(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """Which model a row's CLIP-I and FID are compared with: its subject (style) adapter alone;
    for an adapter alone, the base model; none where the row has no subject (style)."""
    clip_against = fid_against = None
    if config["subject"]:
        clip_against = f"subject {config['subject'][0]}" if config["style"] else "base"
    if config["style"]:
        fid_against = f"style {config['style'][0]}" if config["subject"] else "base"
    return clip_against, fid_against


def interval(value, digits: int) -> list[float]:
    """A bootstrap interval's ends, rounded for the report."""
    return [round(value.low, digits), round(value.high, digits)]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import difftune
    from difftune.metrics.bootstrap import bootstrap_grouped, bootstrap_mean, bootstrap_paired_difference
    from difftune.metrics.cli import EMBEDDED_CLIP
    from difftune.metrics.features import extract_features
    from difftune.metrics.fid import fid_from_features, load_feature_extractor
    from difftune.metrics.similarity import ClipSimilarity, cosine_matrix
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
        took = train_subject(m, out / f"subject_{m}", args)
        if took:
            seconds[f"subject_{m}"] = round(took, 1)
    for s in args.methods:
        for j in args.methods:
            took = train_subject(j, out / f"ontop_{s}_{j}", args, base=out / f"style_{s}")
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

    def fid_of(generated: torch.Tensor, indices: np.ndarray) -> float:
        return fid_from_features(real_features, generated[indices], extractor, kid=False).fid

    def fid_interval(generated: torch.Tensor):
        """FID to the real held-out set, with a bootstrap interval over the generated images."""
        return bootstrap_grouped([lambda i: fid_of(generated, i)], [len(generated)], resamples=args.resamples)

    def fid_difference(generated: torch.Tensor, baseline: torch.Tensor):
        """FID of one model minus another's, paired: the same captions and seeds drawn for both."""
        return bootstrap_grouped([lambda i: fid_of(generated, i) - fid_of(baseline, i)], [len(generated)],
                                 resamples=args.resamples)

    floor = fid_interval(features(reference))
    subject_reference = clip.image_embeddings(subject.images)
    # the ceiling: how alike the subject's own images are (every pair of two different ones)
    own = cosine_matrix(subject_reference, subject_reference)
    ceiling = float(own[~torch.eye(len(own), dtype=torch.bool)].mean())
    pipe = load_pipeline("builtin:embedded", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    sampling = SamplingSettings(steps=args.steps, guidance_scale=5.0, batch_size=args.fid_images)
    rows: list[dict[str, Any]] = []
    per_prompt: dict[str, np.ndarray] = {}  # each model's CLIP-I per subject prompt
    style_features: dict[str, torch.Tensor] = {}  # each model's style images, in world-CLIP features
    # what the models are measured against: the subject's own images and real images of the style
    examples = {REAL: ([image.convert("RGB") for image in subject.images[:3]],
                       [Image.fromarray(a) for a in real[:3]])}
    (out / "examples").mkdir(exist_ok=True)
    for config in configurations(out, args.methods, args.weights):
        if difftune.list_adapters(pipe):
            difftune.remove_adapter(pipe)
        for index, (path, weight) in enumerate(config["adapters"]):
            difftune.load_adapter(pipe, path, scale=weight, adapter_name=f"part_{index}")
        begun = time.perf_counter()
        subject_images = generate(pipe, subject_prompts, sampling)
        style_images = generate(pipe, style_prompts, sampling)
        # CLIP-I per prompt (its images against every subject image), resampled over prompts
        per_image = cosine_matrix(clip.image_embeddings(to_pil(subject_images)), subject_reference).mean(1)
        name = config["name"]
        per_prompt[name] = per_image.reshape(1, args.subject_prompts, args.images_per_prompt).mean(2).numpy()
        clip_i = bootstrap_mean(per_prompt[name], resamples=args.resamples * 10)
        style_features[name] = features(style_images)
        fid = fid_interval(style_features[name])
        row = {key: config.get(key) for key in ("name", "style", "subject", "on_top")}
        row.update({"subject_clip_i": round(clip_i.mean, 4), "subject_clip_i_interval": interval(clip_i, 4),
                    "style_fid": round(fid.mean, 2), "style_fid_interval": interval(fid, 2),
                    "subject_clip_i_per_prompt": [round(float(v), 4) for v in per_prompt[name][0]]})
        # the paired differences to what the row adds to: the adapter alone, or for it the base
        clip_against, fid_against = compared_with(config)
        if clip_against:
            change = bootstrap_paired_difference(per_prompt[name], per_prompt[clip_against],
                                                 resamples=args.resamples * 10)
            row.update({"clip_i_against": clip_against, "clip_i_change": round(change.mean, 4),
                        "clip_i_change_interval": interval(change, 4)})
        if fid_against:
            change = fid_difference(style_features[name], style_features[fid_against])
            row.update({"fid_against": fid_against, "fid_change": round(change.mean, 2),
                        "fid_change_interval": interval(change, 2)})
        row["seconds"] = round(time.perf_counter() - begun, 1)
        rows.append(row)
        examples[config["name"]] = (to_pil(subject_images[::args.images_per_prompt][:3]),
                                    to_pil(style_images[:3]))
        for kind, images in zip(("subject", "style"), examples[config["name"]], strict=True):
            for i, image in enumerate(images):  # kept, so the grid can be drawn again without sampling
                image.save(out / "examples" / f"{config['name'].replace(' ', '_')}-{kind}{i}.png")
        print(f"{config['name']:<40} subject CLIP-I {clip_i.format(3)}  style FID {fid.format(1)}",
              flush=True)
    return {
        "style": args.style, "methods": args.methods, "rows": rows, "style_fid_floor": round(floor.mean, 2),
        "style_fid_floor_interval": interval(floor, 2), "subject_ceiling_clip_i": round(ceiling, 4),
        "interval_level": 0.95, "training_seconds": seconds,
        "settings": {"subject_prompts": args.subject_prompts, "images_per_prompt": args.images_per_prompt,
                     "fid_images": args.fid_images, "real_images": args.real_images, "steps": args.steps,
                     "guidance_scale": 5.0, "style_steps": args.style_steps, "style_batch": args.style_batch,
                     "subject_steps": args.subject_steps or "recipe",
                     "class_images": args.class_images or "recipe",
                     "weights": args.weights, "resamples": args.resamples},
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "examples": examples,
    }


def grid(examples: dict[str, Any], names: list[str]) -> Image.Image:
    """One row per model: three subject images, then three style images (each 64 px, doubled)."""
    from PIL import ImageDraw

    size, label, header = 128, 300, 20
    canvas = Image.new("RGB", (label + 6 * size + 8, header + len(names) * size), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label + 4, 4), "subject prompts (<style> style, a sks red heart ...)", fill="black")
    draw.text((label + 3 * size + 12, 4), "style prompts (<style> style, <held-out caption>)", fill="black")
    for row, name in enumerate(names):
        subject_images, style_images = examples[name]
        top = header + row * size
        draw.text((4, top + size // 2 - 6), name, fill="black")
        for col, image in enumerate([*subject_images, *style_images]):
            x = label + col * size + (8 if col >= 3 else 0)
            canvas.paste(image.resize((size, size), Image.NEAREST), (x, top))
    return canvas


def markdown(report: dict[str, Any]) -> str:
    def cell(value: float, ends: list[float], digits: int, sign: str = "") -> str:
        return f"{value:{sign}.{digits}f} [{ends[0]:{sign}.{digits}f}, {ends[1]:{sign}.{digits}f}]"

    def change(row: dict[str, Any], key: str, digits: int) -> str:
        if f"{key}_change" not in row:
            return ""
        value = cell(row[f"{key}_change"], row[f"{key}_change_interval"], digits, "+")
        return f"{value} vs {row[f'{key}_against']}"

    lines = ["| model | subject CLIP-I ↑ | CLIP-I change (paired) | style FID ↓ | FID change (paired) |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['name']} | {cell(row['subject_clip_i'], row['subject_clip_i_interval'], 3)} | "
                     f"{change(row, 'clip_i', 3)} | {cell(row['style_fid'], row['style_fid_interval'], 1)} | "
                     f"{change(row, 'fid', 1)} |")
    lines.append(f"| *subject images among themselves (CLIP-I ceiling) / real style images (FID floor)* | "
                 f"{report['subject_ceiling_clip_i']:.3f} | | "
                 f"{cell(report['style_fid_floor'], report['style_fid_floor_interval'], 1)} | |")
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
    parser.add_argument("--subject_steps", type=int, default=None,
                        help="subject training steps (default: the embedded recipe's)")
    parser.add_argument("--class_images", type=int, default=None,
                        help="prior-preservation class images (default: the embedded recipe's)")
    parser.add_argument("--subject_prompts", type=int, default=8)
    parser.add_argument("--images_per_prompt", type=int, default=2)
    parser.add_argument("--fid_images", type=int, default=48)
    parser.add_argument("--real_images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resamples", type=int, default=200,
                        help="bootstrap resamples of each FID (CLIP-I, a plain mean, takes 10x as many)")
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
        shown = [REAL] + [row["name"] for row in report["rows"] if "+" not in row["name"]
                          or (row["style"][1] == 1.0 and row["subject"][1] == 1.0)]
        grid(examples, shown).save(DOCS / "images" / "adapter_stacking_grid.png")
        (DOCS / "results").mkdir(exist_ok=True)
        (DOCS / "results" / "adapter_stacking.json").write_text(json.dumps(report, indent=2) + "\n")
        print("docs: docs/images/adapter_stacking_grid.png, docs/results/adapter_stacking.json")


if __name__ == "__main__":
    main()
