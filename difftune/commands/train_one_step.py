#!/usr/bin/env python
"""One-step text-to-image generation with HiPA: train an adapter so that ONE denoiser call from
pure noise gives the image the base model draws in many steps.

    difftune train-one-step --pretrained_model_name_or_path builtin:embedded \\
        --adapter lora --rank 16 --max_train_steps 2000 --output_dir outputs/one_step

On several GPUs: `accelerate launch -m difftune train-one-step ...`. In a checkout,
`python train_scripts/train_one_step.py ...` and `accelerate launch train_scripts/train_one_step.py`
run the same. Every option may come from a YAML or JSON file given with --config (flags override
the file). The command reads top to bottom:
  1. options, and every check that needs no model weights
  2. the teacher cache: the frozen base model's multi-step samples of every prompt, from
     stored noise (resumable: an interrupted generation continues where it stopped)
  3. the adapter (LoRA rank 16 on attention by default) and the batches from the cache
  4. optimizer, learning-rate schedule and, when asked, the checkpoint to resume
  5. the loop: one-step x̂0 → VAE decode → HiPA loss against the teacher's sample;
     checkpoints, and validation grids (one-step student | base one-step | teacher)
  6. the adapter, loaded back into a fresh pipeline for one-step samples, and the
     evaluation on held-out prompts (FID / CLIP score when metrics are configured)
Supported bases: every model family of difftune.families (SD 1.x/2.x with epsilon and v prediction,
SDXL, SD3 and FLUX.1 by flow matching, PixArt-α/Σ; on FLUX.1 --teacher_guidance_scale is the
guidance embedding's value, 3.5 for FLUX.1-dev).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import ClassVar

import torch

import difftune
from difftune.errors import DifftuneError, run_main
from difftune.families import LossOptions, check_capability, get_family, training_family
from difftune.hipa.evaluation import (
    DifftuneMetrics,
    compare_with_teacher,
    evaluate_comparison,
    results_markdown,
)
from difftune.hipa.loss import HiPALoss, HiPALossConfig
from difftune.hipa.one_step import generate_one_step, one_step_timestep
from difftune.hipa.teacher import TeacherSettings, generate_teacher_samples, read_prompts
from difftune.hipa.training import OneStepData, one_step_loss
from difftune.io import write_json, write_text
from difftune.model_factory import describe_model
from difftune.options import CheckedSettings, at_least, check_values, multiple_of, option
from difftune.paths import ASSETS_DIR
from difftune.sampling import image_grid, save_grid
from difftune.training import arguments, checkpointing, loop, recipes, settings
from difftune.training.validation import log_images

DEFAULT_PROMPTS = ASSETS_DIR / "one_step_prompts.txt"
DEFAULT_EVAL_PROMPTS = ASSETS_DIR / "one_step_eval_prompts.txt"
TEACHER_PREFIX = "teacher_"
GRID_COLUMNS = 3  # one-step student | base one-step | teacher


# ---------------------------------------------------------------------------------------------
# 1. Options
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PromptsAndTeacher(CheckedSettings):
    """The training prompts, the image size, and where and how the teacher samples are made."""

    flag_group: ClassVar[str] = "prompts and teacher"

    prompts_file: str = option(str(DEFAULT_PROMPTS),
                               "training prompts, one a line (# comments and blank lines skipped)")
    resolution: int | None = option(None, "image size (default: the model's own)", check=multiple_of(8))
    teacher_dir: str | None = option(None, "teacher cache folder (default: <output_dir>/teacher); reuse one "
                                           "across runs with the same base model and teacher settings")
    teacher_batch_size: int = option(4, "batch size of teacher generation", check=at_least(1))


@dataclasses.dataclass(frozen=True)
class OneStepValidation(CheckedSettings):
    """The validation grids during training and the final comparison on held-out prompts."""

    flag_group: ClassVar[str] = "validation and evaluation"

    validation_steps: int = option(
        100, "every N optimizer steps, save a grid: one-step student | base one-step | teacher, for the "
             "first --num_validation_prompts training prompts", check=at_least(1))
    num_validation_prompts: int = option(4, "rows of the validation grid", check=at_least(1))
    eval_prompts_file: str = option(str(DEFAULT_EVAL_PROMPTS), "held-out prompts for the final comparison "
                                                               "(their teacher samples are cached in "
                                                               "<teacher_dir>/eval)")
    skip_evaluation: bool = option(False, "no final comparison")
    eval_clip_model: str = option(
        "auto", "CLIP hub id or folder for the CLIP score, or 'none'; auto: the embedded model's CLIP for "
                "builtin:embedded, none for the random tiny built-ins, else openai/clip-vit-large-patch14")
    eval_fid_extractor: str = option(
        "auto", "FID features: inception, inception:<weights file>, clip:<id or folder>, dino:<id or "
                "folder>, or 'none'; auto: inception when torch-fidelity is installed, else clip:<the CLIP "
                "model>. FID is taken against the teacher's samples (or --eval_reference_dir), comparable "
                "only within one setting")
    eval_reference_dir: str | None = option(None, "real images to take FID against instead")
    eval_metric_batch_size: int = option(32, "batch size of the metric models", check=at_least(1))


# Every flag of this trainer is a field of one of these, of the teacher's and the loss's options or of a
# method's config (tests/training/test_flags.py checks it). No noise and loss flags: the one-step
# objective is HiPA's.
SETTINGS = (settings.ModelSettings, PromptsAndTeacher, settings.AdapterSettings, settings.OptimizerSettings,
            settings.MemorySettings, settings.AcceleratorSettings, OneStepValidation,
            settings.CheckpointSettings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=arguments.help_formatter(recipes.ONE_STEP_RECIPES))
    parser.add_argument("--config", help="YAML or JSON file of options (keys are flag names without "
                                         "dashes); flags on the command line override it")
    arguments.add_model_arguments(parser)
    arguments.add_settings_arguments(parser, PromptsAndTeacher)
    arguments.add_dataclass_arguments(
        parser, TeacherSettings, "teacher sampling", prefix=TEACHER_PREFIX,
        description="how the frozen base model draws the targets (all recorded in the cache's manifest)")
    arguments.add_dataclass_arguments(
        parser, HiPALossConfig, "HiPA loss",
        description="spatial + high-frequency terms between the decoded one-step x0 and the teacher's sample")

    arguments.add_adapter_arguments(parser)
    arguments.add_optimization_arguments(parser)
    arguments.add_precision_arguments(parser)
    arguments.add_settings_arguments(parser, OneStepValidation)
    recipes.add_recipe_argument(parser)
    arguments.add_checkpoint_arguments(parser)
    arguments.add_logging_arguments(parser)
    parser.set_defaults(output_dir="outputs/one_step", tracker_project_name="difftune-one-step")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    tokens = arguments.command_tokens(parser, argv)
    args = parser.parse_args(tokens)
    # flags left unset take the measured one-step recipe of this base model and method, if any
    args.recipe = recipes.apply_recipe(args, recipes.given_destinations(parser, tokens),
                                       recipes.ONE_STEP_RECIPES)
    check_values(args, PromptsAndTeacher, OneStepValidation)
    arguments.check_common_arguments(args)
    arguments.dataclass_from_args(args, TeacherSettings, TEACHER_PREFIX).validate()
    arguments.dataclass_from_args(args, HiPALossConfig).validate()
    return args


def metric_sources(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(CLIP model, FID extractor spec) for the final evaluation; (None, None) for images only."""
    model, clip, fid = args.pretrained_model_name_or_path, args.eval_clip_model, args.eval_fid_extractor
    if clip == "auto" and model.startswith("builtin:") and model != "builtin:embedded":
        clip = "none"  # the tiny built-ins are random: no metric means anything
    if clip == "none":
        if fid not in ("auto", "none"):
            raise DifftuneError("--eval_fid_extractor needs --eval_clip_model (the evaluation reports both)")
        return None, None
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    from difftune.metrics.cli import BUILTIN_EMBEDDED, EMBEDDED_CLIP, HUB_CLIP
    from difftune.metrics.features import check_model_source

    if clip == "auto":
        clip = str(EMBEDDED_CLIP) if model == BUILTIN_EMBEDDED else HUB_CLIP
    if fid == "auto":
        fid = "inception" if _TORCH_FIDELITY_AVAILABLE else f"clip:{clip}"
    fid = None if fid == "none" else fid
    try:
        check_model_source(clip, "CLIP")
        if fid and ":" in fid and not fid.startswith("inception"):
            check_model_source(fid.partition(":")[2], fid.partition(":")[0].upper())
    except FileNotFoundError as err:
        raise DifftuneError(f"--eval_clip_model / --eval_fid_extractor: {err}") from None
    return clip, fid


def adapter_options_with_defaults(args: argparse.Namespace) -> dict:
    """The method's options from the flags, over the method's own one-step defaults
    (`Adapter.one_step_defaults`: LoRA at rank 16, HiPA's adapter size)."""
    return {**difftune.tuners.get_method(args.adapter).one_step_defaults,
            **arguments.adapter_options(args, args.adapter)}


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    base = arguments.settings_from_args(args, settings.ModelSettings)
    base_model = base.pretrained_model_name_or_path
    checkpoints = arguments.settings_from_args(args, settings.CheckpointSettings)
    output_dir = checkpoints.output_dir
    teacher_dir = Path(args.teacher_dir) if args.teacher_dir else output_dir / "teacher"
    teacher_settings = arguments.dataclass_from_args(args, TeacherSettings, TEACHER_PREFIX)
    loss_config = arguments.dataclass_from_args(args, HiPALossConfig)

    # Everything until the model loads is cheap: refuse bad input here.
    model_info = describe_model(base_model, base.revision)
    check_capability(get_family(model_info.family), "trainable", "train_one_step.py")
    # HiPA sharpens one-step images; a video model's one step has no teacher recipe here (Wan)
    check_capability(get_family(model_info.family), "one_step", "train_one_step.py (HiPA, images)")
    # the adapter: method, targets and options, checked once
    spec = difftune.AdapterSpec(args.adapter, args.targets, adapter_options_with_defaults(args))
    resolution = loop.check_before_loading(spec, base, model_info, args.resolution, output_dir,
                                           args.use_8bit_adam)
    base_adapters = arguments.base_adapters(args)
    loop.check_base_adapters(base_adapters)
    loss_fn = HiPALoss(loss_config)  # loads LPIPS weights when asked: fails early if it cannot
    prompts = read_prompts(args.prompts_file)
    eval_prompts = [] if args.skip_evaluation else read_prompts(args.eval_prompts_file)
    clip_model, fid_extractor = (None, None) if args.skip_evaluation else metric_sources(args)
    reference_images = load_reference_images(args.eval_reference_dir) if args.eval_reference_dir else None
    # the metric networks load now, on the CPU, so a missing one fails before training
    metrics = DifftuneMetrics(clip_model, fid_extractor, batch_size=args.eval_metric_batch_size) \
        if clip_model else None
    run_settings = {"base_model": base_model, **spec.to_dict(), "teacher": vars(teacher_settings),
                    "resolution": resolution, "prompts": prompts, "loss": vars(loss_config),
                    "base_adapters": [list(pair) for pair in base_adapters]}
    optimization_record = checkpointing.optimization_record(
        arguments.settings_from_args(args, settings.OptimizerSettings))
    resume_path, resume_state = checkpointing.resume_point(output_dir, checkpoints.resume_from_checkpoint)
    if resume_state:
        checkpointing.check_resume_fits(resume_state, run_settings, resume_path)
        checkpointing.check_resume_optimization(resume_state, optimization_record, resume_path)

    accelerator = loop.create_accelerator(arguments.settings_from_args(args, settings.AcceleratorSettings),
                                          output_dir)
    if loop.is_fsdp(accelerator):
        raise DifftuneError("train_one_step.py runs on one GPU or under DDP (accelerate launch --multi_gpu); "
                            "FSDP is supported by train_subject.py")
    device, is_main = accelerator.device, accelerator.is_main_process
    weight_dtype = settings.DTYPES[accelerator.mixed_precision]
    seed = loop.resolve_seed(args.seed, resume_state)

    # -----------------------------------------------------------------------------------------
    # 2. The base model and its teacher samples
    # -----------------------------------------------------------------------------------------
    pipeline = loop.load_base_pipeline(base, weight_dtype, device)

    def teacher_cache(prompt_list: list[str], directory: Path):
        with accelerator.autocast():
            generate_teacher_samples(
                pipeline, prompt_list, directory, teacher_settings, height=resolution, width=resolution,
                batch_size=args.teacher_batch_size, model_name=base_model,
                show_progress=is_main, process_index=accelerator.process_index,
                num_processes=accelerator.num_processes)
        accelerator.wait_for_everyone()
        return generate_teacher_samples(  # every sample exists now: this only checks and opens
            pipeline, prompt_list, directory, teacher_settings, height=resolution, width=resolution,
            model_name=base_model, show_progress=False)

    train_cache = teacher_cache(prompts, teacher_dir)
    eval_cache = teacher_cache(eval_prompts, teacher_dir / "eval") if eval_prompts else None

    # -----------------------------------------------------------------------------------------
    # 3. Adapter, loss, batches
    # -----------------------------------------------------------------------------------------
    # the one-step trainer has no noise and loss flags: the family's defaults, and --prediction_type
    loss_options = arguments.settings_from_args(args, LossOptions, skip_none=True, partial=True)
    family = training_family(pipeline, device, loss_options)
    denoiser = family.denoiser
    for frozen in (pipeline.vae, *family.text_encoders):
        frozen.requires_grad_(False)
    step_spec = one_step_timestep(pipeline.scheduler)
    memory = arguments.settings_from_args(args, settings.MemorySettings)
    # the teacher's samples above come from the base model alone; the student trains on top of them
    adapter = loop.attach_trainable_adapter(denoiser, spec, seed, memory, pipeline=pipeline,
                                            base_adapters=base_adapters)
    if memory.gradient_checkpointing:
        pipeline.vae.enable_gradient_checkpointing()  # the decoder is in the graph too
    loss_fn.to(device)
    data = OneStepData(train_cache, family.encode_prompts, seed, device)
    validation_indices = list(range(min(args.num_validation_prompts, len(train_cache))))

    # -----------------------------------------------------------------------------------------
    # 4. Optimizer, schedule, resume
    # -----------------------------------------------------------------------------------------
    optimization = arguments.settings_from_args(args, settings.OptimizerSettings)
    plan = loop.prepare_optimization(optimization, checkpoints, accelerator, denoiser, adapter, len(data),
                                     resume_path, resume_state, device)
    if is_main:
        accelerator.init_trackers(args.tracker_project_name, config=arguments.tracker_config(args))
    max_train_steps, learning_rate = plan.max_train_steps, plan.learning_rate

    if is_main:
        if args.recipe:
            print(recipes.describe(args.recipe, base_model, spec.method))
        resumed = f" | resumed at step {plan.global_step}" if resume_path else ""
        print(f"difftune one-step (HiPA) | {base_model} ({model_info.family}, "
              f"{resolution}px, {accelerator.mixed_precision}) | {spec.method} on {adapter.config.targets}: "
              f"{difftune.count_trainable_parameters(denoiser):,} trainable parameters | one step at t="
              f"{float(step_spec.timestep):g} ({step_spec.prediction_type}) | {len(data)} teacher samples "
              f"({teacher_settings.num_inference_steps} steps, CFG {teacher_settings.guidance_scale}) | "
              f"{max_train_steps} steps x {plan.micro_batch * plan.accumulation} | lr {learning_rate:g} | "
              f"seed {seed}"
              f"{loop.describe_base_adapters(base_adapters)}{resumed}")

    def validate(step: int) -> None:
        if step % args.validation_steps or not is_main:
            return
        denoiser.eval()
        with accelerator.autocast():
            comparison = compare_with_teacher(pipeline, train_cache, validation_indices)
        denoiser.train()
        images = comparison.side_by_side()
        save_grid(images, output_dir / "validation" / f"step-{step:06d}.png", columns=GRID_COLUMNS)
        log_images(accelerator, "one-step student | base one-step | teacher",
                   [image_grid(images, GRID_COLUMNS)], step)

    # -----------------------------------------------------------------------------------------
    # 5. Training loop
    # -----------------------------------------------------------------------------------------
    def compute_loss(indices: range) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms, _ = one_step_loss(family, plan.model, step_spec, data.batch(indices), loss_fn)
        return loss, terms

    plan.model.train()
    trainer_state = {**run_settings, "seed": seed, checkpointing.OPTIMIZATION_KEY: optimization_record}
    loop.train(accelerator, plan, adapter, denoiser, compute_loss, checkpoints=checkpoints,
               trainer_state=trainer_state, base_model=base_model, after_step=validate)

    # -----------------------------------------------------------------------------------------
    # 6. Save; reload into a fresh pipeline; one-step samples; evaluation
    # -----------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    adapter_path = output_dir / "adapter.safetensors"
    model, global_step = plan.model, plan.global_step
    if is_main:
        difftune.save_adapter(accelerator.unwrap_model(model), adapter_path, base_model=base_model)
        del pipeline, family, data, model, denoiser
        fresh = loop.load_base_pipeline(base, weight_dtype, device, adapter_path,  # sample the saved file
                                        base_adapters=base_adapters)
        with accelerator.autocast():
            final = compare_with_teacher(fresh, eval_cache or train_cache,
                                         None if eval_cache else validation_indices)
            sample = generate_one_step(fresh, (eval_prompts or prompts)[0], height=resolution,
                                       width=resolution, generator=torch.Generator(device).manual_seed(seed))
        sample = sample.images[0]
        sample.save(output_dir / "one_step_sample.png")
        grid = save_grid(final.side_by_side(), output_dir / "comparison.png", columns=GRID_COLUMNS)
        log_images(accelerator, "final: one-step student | base one-step | teacher",
                   [image_grid(final.side_by_side(), GRID_COLUMNS)], global_step)
        summary = {"steps": global_step, "adapter": str(adapter_path), "comparison": str(grid),
                   "prompts": final.prompts, "heldout": bool(eval_cache)}
        if metrics is not None:
            results = evaluate_comparison(final, metrics.to(device), reference_images)
            summary["results"] = results
            table = results_markdown(results)
            write_text(output_dir / "evaluation.md", table)
            print(table)
        write_json(output_dir / "evaluation.json", summary)
        print(f"adapter: {adapter_path}\none-step student | base one-step | teacher: {grid}")
    model = plan = None  # the DDP wrapper goes before the process group (loop.end_training)
    loop.end_training(accelerator)
    return adapter_path


def load_reference_images(folder: str) -> list:
    """Real images for FID, every image file of a folder (sorted by name)."""
    from difftune.training.data import open_rgb, scan_image_folder

    return [open_rgb(record.path) for record in scan_image_folder(folder, "--eval_reference_dir")]


if __name__ == "__main__":
    run_main(main)
