"""Command-line pieces shared by the evaluation commands: evaluation flags, model defaults, tables.

``difftune evaluate``, ``difftune benchmark`` and its ``--suite`` (difftune/commands/) take the
same generation, metric and device flags and resolve their ``auto`` defaults the same way,
here. The flags are read once, by `evaluation_options`; everything else takes the resulting
`EvaluationOptions`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ..errors import DifftuneError
from ..options import DTYPES, PRECISIONS, check_finite_numbers
from .subject import ASSETS_DIR, PROMPT_LISTS, GenerationSettings

BUILTIN_EMBEDDED = "builtin:embedded"
EMBEDDED_CLIP = ASSETS_DIR / "embedded_model" / "world_clip"
HUB_CLIP = "openai/clip-vit-large-patch14"
HUB_DINO = "facebook/dino-vits16"


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """The evaluation flags of `add_evaluation_arguments` (fields named as the flags), with the
    generation settings gathered; ``fid`` is the script's own switch for FID."""

    prompts: str
    num_prompts: int | None
    generation: GenerationSettings
    clip_model: str
    dino_model: str
    fid: bool
    fid_extractor: str
    fid_antialias: bool | None  # None: the extractor's own default
    metric_batch_size: int
    device: str
    dtype: str
    metric_dtype: str


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the eval scripts: generation, metric models, FID extractor, device.

    Each script adds its own switch for FID (``args.fid``) and its reference images.
    """
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
    group.add_argument("--num_frames", type=int, default=None,
                       help="video models (Wan): frames per clip, 1 + 4k (default: the pipeline's); every "
                            "metric is then over frames, plus temporal consistency")
    group.add_argument("--eval_seed", type=int, default=0, help="seed of the generated images")
    group = parser.add_argument_group("metrics")
    group.add_argument("--clip_model", default="auto",
                       help="CLIP hub id or folder; auto: the world CLIP for builtin:embedded, "
                            f"else {HUB_CLIP}")
    group.add_argument("--dino_model", default="auto",
                       help=f"DINO / DINOv2 hub id or folder, or 'none'; auto: {HUB_DINO} for hub models, "
                            "none for builtin models (no DINO weights ship offline)")
    group.add_argument("--fid_extractor", default="auto",
                       help="inception, inception:<weights file>, clip:<id or folder>, dino:<id or folder>; "
                            "auto: inception when torch-fidelity is installed, else clip:<the CLIP model>")
    group.add_argument("--fid_antialias", choices=["true", "false"], default=None,
                       help="resize antialiasing of the FID extractor (default: false for Inception, as "
                            "torch-fidelity; true for CLIP/DINO)")
    group.add_argument("--metric_batch_size", type=int, default=32)
    group.add_argument("--no_class_prompts", action="store_true",
                       help="skip the prior-preservation numbers (PRES, class CLIP-T) and the class-prompt "
                            "images they need (by default every run also generates from the prompts "
                            "without the identifier, same seeds)")
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", help="cuda, cpu, ...; auto: cuda when available")
    group.add_argument("--dtype", choices=["auto", *PRECISIONS], default="auto",
                       help="generation dtype; auto: fp16 on cuda, fp32 otherwise")
    group.add_argument("--metric_dtype", choices=list(PRECISIONS), default="fp32",
                       help="dtype of the CLIP/DINO/Inception networks (statistics are always float64)")


def evaluation_options(args: argparse.Namespace) -> EvaluationOptions:
    """The evaluation flags as `EvaluationOptions`."""
    return EvaluationOptions(
        prompts=args.prompts, num_prompts=args.num_prompts, generation=generation_settings(args),
        clip_model=args.clip_model, dino_model=args.dino_model, fid=bool(getattr(args, "fid", False)),
        fid_extractor=args.fid_extractor,
        fid_antialias=None if args.fid_antialias is None else args.fid_antialias == "true",
        metric_batch_size=args.metric_batch_size, device=args.device, dtype=args.dtype,
        metric_dtype=args.metric_dtype)


def check_evaluation_arguments(args: argparse.Namespace, model: str) -> EvaluationOptions:
    """Refuse the generation, metric and device flags' bad values in one line before any model loads
    (a 0 or negative count, nan/inf, a size the model cannot take, an unknown device, a missing
    metric model folder, an output folder that cannot be written); returns the options."""
    from ..io import check_output_dir
    from ..model_factory import describe_model
    check_finite_numbers(args)
    for name in ("num_prompts", "images_per_prompt", "num_inference_steps", "generation_batch_size",
                 "metric_batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise DifftuneError(f"--{name} must be at least 1, got {value}")
    described = describe_model(model)  # also: an unreadable model fails here, in one line
    multiple = described.size_multiple
    check_num_frames(getattr(args, "num_frames", None), described, model)
    sizes = {name: getattr(args, name) for name in ("height", "width") if getattr(args, name) is not None}
    if sizes:
        for name, value in sizes.items():
            if value < 1 or value % multiple:
                raise DifftuneError(f"--{name} must be a positive multiple of {multiple} for {model}, "
                                    f"got {value}")
    options = evaluation_options(args)
    resolve_device(options)
    check_metric_sources(options, model)
    check_output_dir(args.output_dir)
    return options


def check_num_frames(frames: int | None, described, model: str) -> None:
    """``--num_frames``: video models only, a length the VAE takes (1 + k·its frame multiple)."""
    from ..families import get_family

    if frames is None:
        return
    if not get_family(described.family).video:
        raise DifftuneError(f"--num_frames applies to video models (Wan); {model} is a {described.family} "
                            "image model")
    if frames < 1 or (frames - 1) % described.frame_multiple:
        raise DifftuneError(f"--num_frames {frames}: clips of {model} have 1 + {described.frame_multiple}·k "
                            "frames")


def resolve_device(options: EvaluationOptions) -> tuple[torch.device, torch.dtype]:
    """``--device`` (auto: cuda when available) and the generation dtype; an unknown or absent device
    is refused naming the flag."""
    name = options.device
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                              else "cpu" if name == "auto" else name)
    except RuntimeError:
        raise DifftuneError(f"--device {name}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DifftuneError(f"--device {name}: no CUDA GPU is visible to PyTorch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DifftuneError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    if options.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[options.dtype]
    return device, dtype


def resolve_prompt_file(options: EvaluationOptions, model: str) -> Path:
    choice = options.prompts
    if choice == "auto":
        choice = "world" if model == BUILTIN_EMBEDDED else "dreambooth"
    path = PROMPT_LISTS.get(choice, Path(choice))
    if not path.is_file():
        raise DifftuneError(f"--prompts: {path} does not exist (or use 'dreambooth' / 'world')")
    return path


def resolve_metric_models(options: EvaluationOptions, model: str) -> tuple[str, str | None, str | None]:
    """(CLIP, DINO or None, FID extractor spec or None) from the auto defaults."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    clip = options.clip_model
    if clip == "auto":
        clip = str(EMBEDDED_CLIP) if model == BUILTIN_EMBEDDED else HUB_CLIP
    dino = options.dino_model
    if dino == "auto":
        dino = None if model.startswith("builtin:") else HUB_DINO
    elif dino == "none":
        dino = None
    fid = None
    if options.fid:
        fid = options.fid_extractor
        if fid == "auto":
            fid = "inception" if _TORCH_FIDELITY_AVAILABLE else f"clip:{clip}"
    return clip, dino, fid


def build_scorer(options: EvaluationOptions, model: str, device: torch.device):
    """Load the metric networks once (before any generation), so a missing model fails early."""
    from .fid import load_feature_extractor
    from .similarity import ClipSimilarity, DinoSimilarity
    from .subject import SubjectScorer

    clip_name, dino_name, fid_spec = resolve_metric_models(options, model)
    loading = {"device": device, "dtype": DTYPES[options.metric_dtype],
               "batch_size": options.metric_batch_size}
    clip = ClipSimilarity.from_pretrained(clip_name, **loading)
    dino = DinoSimilarity.from_pretrained(dino_name, **loading) if dino_name else None
    extractor = (load_feature_extractor(fid_spec, antialias=options.fid_antialias, **loading)
                 if fid_spec else None)
    return SubjectScorer(clip, dino, extractor, batch_size=options.metric_batch_size)


def load_eval_pipeline(model: str, device: torch.device, dtype: torch.dtype):
    """The pipeline to generate evaluation images: on ``device`` in ``dtype``, no safety checker.

    A safety checker blacks out the images it flags, which would corrupt every metric.
    (SDXL pipelines upcast their VAE themselves when its config asks for it.)
    """
    from ..model_factory import load_pipeline

    pipe = load_pipeline(model, torch_dtype=dtype).to(device)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    return pipe


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The generation flags as the settings every evaluation result records."""
    return GenerationSettings(images_per_prompt=args.images_per_prompt, seed=args.eval_seed,
                              num_inference_steps=args.num_inference_steps,
                              guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                              batch_size=args.generation_batch_size,
                              num_frames=getattr(args, "num_frames", None))


def write_tables(results: list[dict], output_dir: Path, title: str) -> None:
    from difftune.metrics.subject import SUMMARY_HEADERS, fid_note, models_note, summary_columns, summary_rows

    from ..io import write_json, write_text
    from .reporting import markdown_table, write_csv

    rows = summary_rows(results)
    columns = summary_columns(results)
    write_json(output_dir / "results.json", results)
    write_csv(output_dir / "results.csv", rows, columns)
    note = fid_note(results)
    models = sorted({(r["clip_model"], r["dino_model"]) for r in results})
    lines = [f"# {title}", "", markdown_table(rows, columns, SUMMARY_HEADERS)]
    lines += [models_note(clip_model, dino_model) for clip_model, dino_model in models]
    if "class_clip_t" in columns:
        embedding = "DINO" if "pres" in columns else "CLIP-I"
        lines.append(f"{SUMMARY_HEADERS[columns[-2]]}: mean {embedding} cosine of the class-prompt images "
                     "(the prompts without the identifier, same seeds) to the subject images; lower: the "
                     "class prior is kept. class CLIP-T: those images against their class prompts.")
    if note:
        lines.append(note)
    write_text(output_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def check_metric_sources(options: EvaluationOptions, model: str) -> None:
    """Refuse a missing local CLIP/DINO folder or an unknown FID extractor before any long work."""
    from .features import check_model_source

    clip, dino, fid = resolve_metric_models(options, model)
    checks = [("--clip_model", clip, "CLIP")] + ([("--dino_model", dino, "DINO")] if dino else [])
    if fid:
        kind, _, source = fid.partition(":")
        if kind not in ("inception", "clip", "dino") or (kind != "inception" and not source):
            raise DifftuneError(f"--fid_extractor {fid}: use inception, inception:<weights file>, "
                                "clip:<hub id or folder> or dino:<hub id or folder>")
        if kind != "inception":
            checks.append(("--fid_extractor", source, kind.upper()))
    for flag, source, what in checks:
        try:
            check_model_source(source, what)
        except FileNotFoundError as err:
            raise DifftuneError(f"{flag}: {err}") from None
