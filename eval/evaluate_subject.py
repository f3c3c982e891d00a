"""Evaluate subject-driven adapters with the DreamBooth protocol: DINO, CLIP-I, CLIP-T (+ CLIP, FID).

For each adapter file and subject: ``--images_per_prompt`` images for every prompt of a
prompt list (``{subject}`` becomes "identifier class"), then the metrics against the
subject's images; optionally FID/KID against a reference folder (e.g. class images).
Writes, under ``--output_dir``: ``<run>/<subject>/images/*.png``, ``grid.png``,
``metrics.json`` (with per-prompt numbers), and ``results.json`` / ``results.md`` /
``results.csv`` for all runs. Runs whose results are already there are not redone.

    # the embedded default, offline on CPU
    python eval/evaluate_subject.py --adapter lora=outputs/lora/adapter.safetensors \\
        --instance_data_dir assets/subject --include_base --output_dir outputs/eval

    # SD 1.5 on a GPU (fp16 generation; CLIP ViT-L/14 and DINO ViT-S/16 from the hub)
    python eval/evaluate_subject.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter outputs/dog/adapter.safetensors --instance_data_dir data/dog --class_name dog \\
        --class_data_dir data/class_dog --fid --output_dir outputs/eval_dog
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from difftune.errors import DifftuneError
from difftune.metrics.subject import (
    PROMPT_LISTS,
    EvalRun,
    GenerationSettings,
    Subject,
    evaluate_runs,
    load_images,
)

BUILTIN_EMBEDDED = "builtin:embedded"
EMBEDDED_CLIP = Path(__file__).resolve().parent.parent / "assets" / "embedded_model" / "world_clip"
HUB_CLIP = "openai/clip-vit-large-patch14"
HUB_DINO = "facebook/dino-vits16"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with eval/benchmark.py: generation, metric models, FID, device."""
    group = parser.add_argument_group("generation")
    group.add_argument("--prompts", default="auto",
                       help="prompt list file, or 'dreambooth' / 'world' (the lists in assets/prompts); "
                            "auto: 'world' for builtin:embedded, else 'dreambooth'")
    group.add_argument("--num_prompts", type=int, default=None, help="use only the first N prompts")
    group.add_argument("--images_per_prompt", type=int, default=4)
    group.add_argument("--num_inference_steps", type=int, default=25)
    group.add_argument("--guidance_scale", type=float, default=7.5)
    group.add_argument("--height", type=int, default=None, help="default: the pipeline's")
    group.add_argument("--width", type=int, default=None, help="default: the pipeline's")
    group.add_argument("--generation_batch_size", type=int, default=8)
    group.add_argument("--eval_seed", type=int, default=0, help="seed of the generated images")
    group = parser.add_argument_group("metrics")
    group.add_argument("--clip_model", default="auto",
                       help="CLIP hub id or folder; auto: the world CLIP for builtin:embedded, "
                            f"else {HUB_CLIP}")
    group.add_argument("--dino_model", default="auto",
                       help=f"DINO / DINOv2 hub id or folder, or 'none'; auto: {HUB_DINO} for hub models, "
                            "none for builtin models (no DINO weights ship offline)")
    group.add_argument("--fid", action="store_true", help="also compute FID/KID against --class_data_dir")
    group.add_argument("--class_data_dir", type=Path, default=None, help="reference images for FID")
    group.add_argument("--fid_extractor", default="auto",
                       help="inception, inception:<weights file>, clip:<id or folder>, dino:<id or folder>; "
                            "auto: inception when torch-fidelity is installed, else clip:<the CLIP model>")
    group.add_argument("--fid_antialias", choices=["true", "false"], default=None,
                       help="resize antialiasing of the FID extractor (default: false for Inception, as "
                            "torch-fidelity; true for CLIP/DINO)")
    group.add_argument("--metric_batch_size", type=int, default=32)
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", help="cuda, cpu, ...; auto: cuda when available")
    group.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="generation dtype; auto: fp16 on cuda, fp32 otherwise")
    group.add_argument("--metric_dtype", choices=list(DTYPES), default="fp32",
                       help="dtype of the CLIP/DINO/Inception networks (statistics are always float64)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=BUILTIN_EMBEDDED,
                        help="built-in name, hub id or local pipeline folder")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                        help="adapter file or its folder; repeat for several "
                             "(NAME defaults to the folder name)")
    parser.add_argument("--include_base", action="store_true", help="also evaluate the base model as 'base'")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter strength at inference")
    parser.add_argument("--instance_data_dir", action="append", type=Path, default=[],
                        help="subject images (repeat for several subjects; with as many adapters as "
                             "subjects they pair up in order, with one subject every adapter uses it)")
    parser.add_argument("--identifier", default=None,
                        help="identifier token (default: the subject folder's subject.json, else sks)")
    parser.add_argument("--class_name", default=None,
                        help="class noun (default: the subject folder's subject.json)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="recompute runs that already have results")
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)
    if not args.adapter and not args.include_base:
        parser.error("nothing to evaluate: pass --adapter and/or --include_base")
    if not args.instance_data_dir:
        parser.error("--instance_data_dir is required")
    if args.fid and args.class_data_dir is None:
        parser.error("--fid needs --class_data_dir (the reference images)")
    return args


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    return device, dtype


def resolve_prompt_file(args: argparse.Namespace, model: str) -> Path:
    choice = args.prompts
    if choice == "auto":
        choice = "world" if model == BUILTIN_EMBEDDED else "dreambooth"
    path = PROMPT_LISTS.get(choice, Path(choice))
    if not path.is_file():
        raise DifftuneError(f"--prompts: {path} does not exist (or use 'dreambooth' / 'world')")
    return path


def resolve_metric_models(args: argparse.Namespace, model: str) -> tuple[str, str | None, str | None]:
    """(CLIP, DINO or None, FID extractor spec or None) from the auto defaults."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    clip = args.clip_model
    if clip == "auto":
        clip = str(EMBEDDED_CLIP) if model == BUILTIN_EMBEDDED else HUB_CLIP
    dino = args.dino_model
    if dino == "auto":
        dino = None if model.startswith("builtin:") else HUB_DINO
    elif dino == "none":
        dino = None
    fid = None
    if args.fid:
        fid = args.fid_extractor
        if fid == "auto":
            fid = "inception" if _TORCH_FIDELITY_AVAILABLE else f"clip:{clip}"
    return clip, dino, fid


def build_scorer(args: argparse.Namespace, model: str, device: torch.device):
    """Load the metric networks once (before any generation), so a missing model fails early."""
    from difftune.metrics import ClipSimilarity, DinoSimilarity, load_feature_extractor
    from difftune.metrics.subject import SubjectScorer

    clip_name, dino_name, fid_spec = resolve_metric_models(args, model)
    dtype = DTYPES[args.metric_dtype]
    options = {"device": device, "dtype": dtype, "batch_size": args.metric_batch_size}
    clip = ClipSimilarity.from_pretrained(clip_name, **options)
    dino = DinoSimilarity.from_pretrained(dino_name, **options) if dino_name else None
    antialias = None if args.fid_antialias is None else args.fid_antialias == "true"
    extractor = load_feature_extractor(fid_spec, antialias=antialias, **options) if fid_spec else None
    return SubjectScorer(clip, dino, extractor, batch_size=args.metric_batch_size)


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    return GenerationSettings(images_per_prompt=args.images_per_prompt, seed=args.eval_seed,
                              num_inference_steps=args.num_inference_steps,
                              guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                              batch_size=args.generation_batch_size)


def parse_adapter(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, ""
    file = Path(path)
    if file.is_dir():
        file = file / "adapter.safetensors"
    if not file.is_file():
        raise DifftuneError(f"--adapter {spec}: {file} does not exist")
    return name or file.parent.name, file


def build_runs(args: argparse.Namespace) -> list[EvalRun]:
    subjects = [Subject.from_dir(d, args.identifier, args.class_name) for d in args.instance_data_dir]
    adapters = [parse_adapter(spec) for spec in args.adapter]
    names = [name for name, _ in adapters]
    if len(set(names)) != len(names):
        raise DifftuneError(f"--adapter names repeat ({', '.join(names)}): give each one NAME=PATH")
    if len(subjects) == 1:
        pairs = [(name, path, subjects[0]) for name, path in adapters]
    elif len(subjects) == len(adapters):
        pairs = [(name, path, subject) for (name, path), subject in zip(adapters, subjects, strict=True)]
    else:
        raise DifftuneError(f"{len(adapters)} adapters and {len(subjects)} subjects: pass one subject, "
                            "or one subject per adapter")
    runs = [EvalRun(name, path, subject, args.scale) for name, path, subject in pairs]
    if args.include_base:
        runs = [EvalRun("base", None, subject) for subject in subjects] + runs
    return runs


def write_tables(results: list[dict], output_dir: Path, title: str) -> None:
    from difftune.metrics.reporting import markdown_table, write_csv, write_json, write_text
    from difftune.metrics.subject import SUMMARY_COLUMNS, SUMMARY_HEADERS, fid_note, summary_rows

    rows = summary_rows(results)
    write_json(output_dir / "results.json", results)
    write_csv(output_dir / "results.csv", rows, SUMMARY_COLUMNS)
    note = fid_note(results)
    models = sorted({(r["clip_model"], r["dino_model"]) for r in results})
    lines = [f"# {title}", "", markdown_table(rows, SUMMARY_COLUMNS, SUMMARY_HEADERS)]
    lines += [f"CLIP: {c}; DINO: {d or 'not computed'}." for c, d in models]
    if note:
        lines.append(note)
    write_text(output_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from difftune.model_factory import load_pipeline

    model = args.pretrained_model_name_or_path
    device, dtype = resolve_device(args)
    runs = build_runs(args)  # validates every path before any heavy work
    prompt_file = resolve_prompt_file(args, model)
    fid_reference = None
    if args.fid:
        fid_reference = (str(args.class_data_dir), load_images(args.class_data_dir, "--class_data_dir"))
    scorer = build_scorer(args, model, device)
    pipe = load_pipeline(model, torch_dtype=dtype).to(device)
    results = evaluate_runs(pipe, runs, prompt_file, generation_settings(args), scorer, args.output_dir,
                            model, fid_reference=fid_reference, num_prompts=args.num_prompts,
                            overwrite=args.overwrite)
    write_tables(results, args.output_dir, f"Subject evaluation of {model}")
    return results


if __name__ == "__main__":
    main()
