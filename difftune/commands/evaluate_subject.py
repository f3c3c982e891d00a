"""Evaluate subject-driven adapters with the DreamBooth protocol: DINO, CLIP-I, CLIP-T, PRES (+ CLIP, FID);
on a video model (Wan) every metric over the clips' frames, plus temporal consistency (--num_frames).

For each adapter file and subject: ``--images_per_prompt`` images for every prompt of a
prompt list (``{subject}`` becomes "identifier class"), then the metrics against the
subject's images; optionally FID/KID against a reference folder (e.g. class images).
Prior preservation: as many images, with the same seeds, from the class prompts (the
prompts without the identifier: "a dog on the beach"); PRES is their mean DINO (without
a DINO model: CLIP-I, reported as PRES-CLIP-I) to the subject's images, lower meaning the
class is still drawn as a class, and class CLIP-T their CLIP-T against the class prompts.
Writes, under ``--output_dir``: ``<run>/<subject>/images/*.png``, ``grid.png``,
``class_images/*.png``, ``class_grid.png``, ``metrics.json`` (with per-prompt numbers),
and ``results.json`` / ``results.md`` / ``results.csv`` for all runs. Runs whose results
are already there are not redone.

    # the embedded default, offline on CPU (python eval/evaluate_subject.py in a checkout is the same)
    difftune evaluate --adapter lora=outputs/lora/adapter.safetensors \\
        --instance_data_dir builtin:star --include_base --output_dir outputs/eval

    # SD 1.5 on a GPU (fp16 generation; CLIP ViT-L/14 and DINO ViT-S/16 from the hub)
    difftune evaluate \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter outputs/dog/adapter.safetensors --instance_data_dir data/dog --class_name dog \\
        --class_data_dir data/class_dog --fid --output_dir outputs/eval_dog
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difftune.errors import DifftuneError, run_main
from difftune.metrics.cli import (
    BUILTIN_EMBEDDED,
    add_evaluation_arguments,
    build_scorer,
    check_evaluation_arguments,
    load_eval_pipeline,
    resolve_device,
    resolve_prompt_file,
    write_tables,
)
from difftune.metrics.subject import EvalRun, Subject, evaluate_runs, load_images, run_prompts
from difftune.options import argument_type
from difftune.paths import subject_folder


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
    parser.add_argument("--instance_data_dir", action="append", default=[],
                        type=argument_type(subject_folder),
                        help="subject images, or a shipped subject (builtin:heart, ...); repeat for several "
                             "subjects (with as many adapters as subjects they pair up in order, with one "
                             "subject every adapter uses it)")
    parser.add_argument("--identifier", default=None,
                        help="identifier token (default: the subject folder's subject.json, else sks)")
    parser.add_argument("--class_name", default=None,
                        help="class noun (default: the subject folder's subject.json)")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true", help="recompute runs that already have results")
    parser.add_argument("--fid", action="store_true", help="also compute FID/KID against --class_data_dir")
    parser.add_argument("--class_data_dir", type=Path, default=None, help="reference images for FID")
    add_evaluation_arguments(parser)
    args = parser.parse_args(argv)
    if not args.adapter and not args.include_base:
        parser.error("nothing to evaluate: pass --adapter and/or --include_base")
    if not args.instance_data_dir:
        parser.error("--instance_data_dir is required")
    if args.fid and args.class_data_dir is None:
        parser.error("--fid needs --class_data_dir (the reference images)")
    return args


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


def build_runs(args: argparse.Namespace, video: bool = False) -> list[EvalRun]:
    """The runs to evaluate; a video model's subjects are the frames of their clips (and images)."""
    subjects = [Subject.from_dir(d, args.identifier, args.class_name, clips=video)
                for d in args.instance_data_dir]
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


def check_adapter_files(runs: list[EvalRun], model: str) -> None:
    """Every --adapter file read and checked against the base model's weightless denoiser, before the
    pipeline, the metric networks or any base-model image."""
    from difftune.adapter_checks import check_adapter_file
    from difftune.model_factory import build_denoiser_on_meta, describe_model

    info = describe_model(model)
    denoiser = build_denoiser_on_meta(info.denoiser_config, info.denoiser_class)
    for run in runs:
        if run.adapter is not None:
            try:
                check_adapter_file(run.adapter, denoiser)
            except DifftuneError as err:
                raise DifftuneError(f"--adapter {run.name}: {err}") from None


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    model = args.pretrained_model_name_or_path
    options = check_evaluation_arguments(args, model)
    device, dtype = resolve_device(options)
    from difftune.families import get_family
    from difftune.model_factory import describe_model

    video = get_family(describe_model(model).family).video
    runs = build_runs(args, video)  # validates every path before any heavy work
    check_adapter_files(runs, model)
    prompt_file = resolve_prompt_file(options, model)
    for run in runs:  # a bad prompt file or an identifier the prompts keep fails before any model loads
        run_prompts(prompt_file, run.subject, args.num_prompts, not args.no_class_prompts)
    fid_reference = None
    if args.fid:
        fid_reference = (str(args.class_data_dir), load_images(args.class_data_dir, "--class_data_dir"))
    scorer = build_scorer(options, model, device)
    pipe = load_eval_pipeline(model, device, dtype)
    results = evaluate_runs(pipe, runs, prompt_file, options.generation, scorer, args.output_dir,
                            model, fid_reference=fid_reference, num_prompts=args.num_prompts,
                            overwrite=args.overwrite, with_class_prompts=not args.no_class_prompts)
    write_tables(results, args.output_dir, f"Subject evaluation of {model}")
    return results


if __name__ == "__main__":
    run_main(main)
