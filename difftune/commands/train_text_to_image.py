#!/usr/bin/env python
"""Fine-tuning of a difftune adapter (LoRA, SaRA, SVFit, TLoRA, ...) on a captioned image dataset:
a style, a domain, a look, as diffusers' train_text_to_image_lora.py, kohya and SimpleTuner do.

    accelerate launch -m difftune train-text-to-image --preset sd15 \\
        --train_data_dir my_style --caption_prefix "mystyle style," \\
        --adapter sara --output_dir outputs/mystyle

    difftune train-text-to-image --pretrained_model_name_or_path builtin:embedded \\
        --dataset_name path/or/hub-name --image_column image --caption_column text \\
        --enable_bucket --use_ema --validation_prompt "a red circle" "a blue square"

In a checkout, `python train_scripts/train_text_to_image.py ...` and `accelerate launch
train_scripts/train_text_to_image.py` run the same. Every option is a flag and may come from a YAML
or JSON file given with --config (flags override the file); --preset fills the flags left unset from
a real model's settings (one per image model family: sd15, sdxl, sd3, flux, pixart, flux2,
flux2-klein, qwen-image, z-image).

The command reads top to bottom:
  1. options, and every check that needs no model weights: the model, the adapter, and every image
     and caption of the data (bad ones are named in one line, in seconds)
  2. the base model and the adapter
  3. the data: aspect buckets (a batch from one bucket), latent and prompt-embedding caches
  4. optimizer, learning-rate schedule, the moving average of the adapter (--use_ema) and, when
     asked, the checkpoint to resume
  5. the training loop: checkpoints every --checkpointing_steps, a grid of the validation prompts
     every --validation_steps
  6. the adapter (the moving average with --use_ema), a model card, samples from a fresh pipeline
     that loads the saved file, exports
The loop, checkpoints, exact resume, validation and export are the subject trainer's
(difftune.training); every model family and adapter method of difftune trains here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import ClassVar

import torch

import difftune
from difftune.errors import DifftuneError, run_main
from difftune.families import LossOptions
from difftune.options import CheckedSettings, check_values, in_range, option, positive
from difftune.training import arguments, buckets, captioned, checkpointing, loop, recipes, session, settings
from difftune.training.data import SubjectDataset, warn_small_images
from difftune.training.ema import AdapterEMA
from difftune.training.model_card import write_model_card
from difftune.training.summary import reset_peak_memory

COMMAND = "difftune train-text-to-image"  # how refusals name it


# ---------------------------------------------------------------------------------------------
# 1. Options
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CaptionedTraining(CheckedSettings):
    """How the captioned examples are trained on (where they come from: `captioned.CaptionedSource`)."""

    flag_group: ClassVar[str] = "data"

    caption_dropout: float = option(
        0.0, "share of examples trained with the empty caption, so classifier-free guidance still works "
             "(kohya's caption_dropout_rate, diffusers' proportion_empty_prompts)",
        check=in_range(0, 1, high_open=True),
        aliases=("--caption_dropout_rate", "--proportion_empty_prompts"))
    resolution: int | None = option(None, "training resolution; with --enable_bucket the area of every "
                                          "bucket is its square (default: the model's own)", check=positive())
    pre_compute_text_embeddings: bool = option(True, "encode every caption once before training")


@dataclasses.dataclass(frozen=True)
class AspectBuckets(CheckedSettings):
    """Aspect-ratio buckets as kohya and SimpleTuner users know them (checked against the model by
    `buckets.BucketSettings.check`)."""

    flag_group: ClassVar[str] = "aspect-ratio buckets (kohya / SimpleTuner)"

    enable_bucket: bool = option(False, "sort images into buckets of about resolution² pixels and different "
                                        "shapes (each to the nearest aspect ratio, scaled to cover it, "
                                        "cropped); a batch is drawn from one bucket; the bucket counts are "
                                        "printed")
    bucket_min_side: int | None = option(None, "shortest bucket side (default: half the resolution)",
                                         aliases=("--min_bucket_reso",))
    bucket_max_side: int | None = option(None, "longest bucket side (default: twice the resolution)",
                                         aliases=("--max_bucket_reso",))
    bucket_step: int | None = option(None, "bucket sides are multiples of this (default: 64, or resolution/8 "
                                           "below 512 px)", aliases=("--bucket_reso_steps",))


@dataclasses.dataclass(frozen=True)
class MovingAverage(CheckedSettings):
    """An exponential moving average of the adapter's trained tensors (training/ema.py)."""

    flag_group: ClassVar[str] = "moving average of the adapter"

    use_ema: bool = option(False, "keep an exponential moving average of the adapter's trained tensors; "
                                  "validation samples and the saved adapter use it, checkpoints hold it "
                                  "beside the trained ones")
    ema_decay: float = option(0.999, "its decay (diffusers' EMAModel: step n uses min(decay, (1 + n) / "
                                     "(10 + n)))", check=in_range(0, 1, low_open=True, high_open=True))


@dataclasses.dataclass(frozen=True)
class ValidationPrompts(settings.ValidationSettings):
    """The shared validation settings, with several prompts: one grid row each."""

    validation_prompt: list[str] | None = option(
        None, "prompts sampled every --validation_steps and at the end, one grid row per prompt (default: "
              "none during training, the first caption at the end)")


# Every flag of this trainer is a field of one of these (the method options aside, generated from the
# registered methods' configs; --preset fills other flags): tests/training/test_flags.py checks that
# nothing else is a flag.
DATA_SETTINGS = (captioned.CaptionedSource, CaptionedTraining, settings.ImageSettings, AspectBuckets,
                 MovingAverage)
SETTINGS = (settings.ModelSettings, *DATA_SETTINGS, settings.AdapterFiles,
            *(ValidationPrompts if each is settings.ValidationSettings else each
              for each in arguments.SHARED_SETTINGS))


def build_parser() -> argparse.ArgumentParser:
    parser = arguments.trainer_parser(__doc__)  # with --config
    recipes.add_preset_argument(parser)
    arguments.add_model_arguments(parser)
    arguments.add_settings_arguments(parser, captioned.CaptionedSource, CaptionedTraining,
                                     settings.ImageSettings)
    arguments.add_settings_arguments(parser, AspectBuckets)
    arguments.add_settings_arguments(parser, MovingAverage)
    arguments.add_adapter_file_arguments(parser)  # --init_adapter, --export
    arguments.add_training_arguments(parser, validation=ValidationPrompts)
    parser.set_defaults(output_dir="outputs/text_to_image", tracker_project_name="difftune-text-to-image")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args, given = arguments.parse_command(build_parser(), argv)
    args.preset_applied = recipes.apply_preset(args, given)  # flags left unset take the preset's values
    check_values(args, *DATA_SETTINGS)
    bucket_flags = [f"--{n}" for n in ("bucket_min_side", "bucket_max_side", "bucket_step")
                    if getattr(args, n) is not None]
    if bucket_flags and not args.enable_bucket:
        raise DifftuneError(f"{' and '.join(bucket_flags)} given without --enable_bucket")
    arguments.check_common_arguments(args)
    return args


def bucket_settings(args: argparse.Namespace, resolution: int, size_multiple: int) -> buckets.BucketSettings:
    """The bucket grid from the flags, with kohya-like defaults around ``resolution``."""
    step = args.bucket_step or max(size_multiple, min(64, resolution // 8) // size_multiple * size_multiple)
    grid = buckets.BucketSettings(resolution, args.bucket_min_side or resolution // 2,
                                  args.bucket_max_side or resolution * 2, step)
    grid.check(size_multiple)
    return grid


def check_before_loading(argv: list[str] | None = None):
    """Every check that needs no model weights: options, model family, adapter options and targets,
    exports, resolution and buckets, output folder, and every example of the data. Returns (args,
    model_info, spec, resolution, examples, bucket of each example or None)."""
    args = parse_args(argv)

    def refuse_video(model_info, family) -> None:
        if family.video:
            model = args.pretrained_model_name_or_path
            raise DifftuneError(f"{COMMAND} trains image models on captioned images; {model} is a video "
                                f"model ({family.title}): train it on a folder of clips with difftune "
                                "train-subject (docs/video.md)")

    model_info, spec, resolution = session.check_model_and_adapter(args, COMMAND, refuse_video)
    grid = buckets.bucket_sizes(bucket_settings(args, resolution, model_info.size_multiple)) \
        if args.enable_bucket else None
    examples = captioned.read_examples(arguments.settings_from_args(args, captioned.CaptionedSource))
    example_buckets = [buckets.nearest_bucket(r.width, r.height, grid) for r in examples] if grid else None
    return args, model_info, spec, resolution, examples, example_buckets


def main(argv: list[str] | None = None) -> Path:
    started = time.perf_counter()
    args, model_info, spec, resolution, examples, example_buckets = check_before_loading(argv)
    base, checkpoints, validation, export = session.trainer_settings(args, ValidationPrompts)
    base_model, output_dir = base.pretrained_model_name_or_path, checkpoints.output_dir
    warn_small_images(examples, resolution, "--train_data_dir" if args.train_data_dir else "--dataset_name")
    # a checkpoint resumes only the run that wrote it: same model, adapter, data and average
    bucket_list = [list(bucket) for bucket in sorted(set(example_buckets))] if example_buckets else None
    base_adapters = arguments.base_adapters(args)
    run_settings = {"base_model": base_model, **spec.to_dict(), "examples": len(examples),
                    "resolution": resolution, "buckets": bucket_list,
                    "caption_prefix": args.caption_prefix, "caption_dropout": args.caption_dropout,
                    "ema_decay": args.ema_decay if args.use_ema else None,
                    "base_adapters": [list(pair) for pair in base_adapters]}
    optimization, optimization_record, resume_path, resume_state = session.resume_point(
        args, checkpoints, run_settings)

    accelerator, sharded, weight_dtype, seed = session.start_accelerator(args, spec.method, model_info.family,
                                                                         checkpoints, resume_state)
    device, is_main = accelerator.device, accelerator.is_main_process

    # -----------------------------------------------------------------------------------------
    # 2. Base model (VAE and text encoders frozen) and adapter
    # -----------------------------------------------------------------------------------------
    loss_options = arguments.settings_from_args(args, LossOptions, skip_none=True)
    pipeline, family = loop.load_training_model(base, loss_options, weight_dtype, device)
    denoiser = family.denoiser
    loop.attach_base_adapters(pipeline, base_adapters)  # --base_adapter: frozen, under the trained one
    memory = arguments.settings_from_args(args, settings.MemorySettings)
    adapter = loop.attach_trainable_adapter(denoiser, spec, seed, memory, args.init_adapter, pipeline)

    # -----------------------------------------------------------------------------------------
    # 3. Data
    # -----------------------------------------------------------------------------------------
    # every micro-step of every process reads one aligned block of the stream: one bucket
    micro_batch = args.train_batch_size * accelerator.num_processes
    data = captioned.CaptionedData(
        SubjectDataset(examples, ""), caption_dropout=args.caption_dropout, buckets=example_buckets,
        block=micro_batch, encode_images=family.encode_images, encode_prompts=family.encode_prompts,
        resolution=resolution, center_crop=args.center_crop, random_flip=args.random_flip, seed=seed,
        cache_latents=args.cache_latents, cache_prompts=args.pre_compute_text_embeddings, device=device)
    data.build_caches(show_progress=is_main)

    # -----------------------------------------------------------------------------------------
    # 4. Optimizer, schedule, moving average, resume
    # -----------------------------------------------------------------------------------------
    plan = loop.prepare_optimization(optimization, checkpoints, accelerator, denoiser, adapter,
                                     data.epoch_length, resume_path, resume_state, device)
    ema = AdapterEMA([denoiser], args.ema_decay) if args.use_ema else None
    if ema is not None and resume_path:
        checkpointing.load_extra_state(resume_path, "ema", ema)
    averaged = ema.applied if ema is not None else contextlib.nullcontext
    validate = session.Validator(accelerator, family, validation, validation.prompts, seed=seed,
                                 resolution=resolution, output_dir=output_dir, weights=averaged)
    # The frozen encoders are not needed on the device between validations.
    validate.offloaded = session.offload_frozen(
        [*(family.text_encoders if args.pre_compute_text_embeddings else []),
         *([pipeline.vae] if args.cache_latents else [])], device)
    trainable_count = difftune.count_trainable_parameters(denoiser)
    if is_main:
        accelerator.init_trackers(args.tracker_project_name, config=arguments.tracker_config(args))
        if args.preset_applied:
            print(f"preset {args.preset}: " + ", ".join(f"--{k} {v}" for k, v in args.preset_applied.items()))
        if example_buckets:
            print(f"aspect buckets (width x height: images): {buckets.describe_counts(example_buckets)}")
        resumed = f" | resumed at step {plan.global_step} from {resume_path}" if resume_path else ""
        print(f"difftune text-to-image training | {base_model} ({model_info.family}, {resolution}px, "
              f"{accelerator.mixed_precision}) | {spec.method} on {adapter.config.targets}: "
              f"{len(adapter.target_names)} layers, {trainable_count:,} "
              f"trainable parameters | {len(examples)} images, {data.epoch_length} per epoch | "
              f"{plan.max_train_steps} steps x {plan.micro_batch * plan.accumulation} images | lr "
              f"{plan.learning_rate:g} | ema {args.ema_decay if ema else 'off'} | seed {seed}"
              f"{loop.describe_base_adapters(base_adapters)}{resumed}")

    # -----------------------------------------------------------------------------------------
    # 5. Training loop
    # -----------------------------------------------------------------------------------------
    def compute_loss(indices: range) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return loop.diffusion_loss(family, plan.model, data.batch(indices)).mean(), {}

    plan.model.train()
    reset_peak_memory(device)
    first_step, loop_started = plan.global_step, time.perf_counter()
    loop.train(accelerator, plan, adapter, denoiser, compute_loss, checkpoints=checkpoints,
               trainer_state={**run_settings, "seed": seed, "max_train_steps": plan.max_train_steps,
                              checkpointing.OPTIMIZATION_KEY: optimization_record},
               base_model=base_model, save_checkpoints=not sharded, after_step=validate, ema=ema)
    loop_seconds = time.perf_counter() - loop_started

    # -----------------------------------------------------------------------------------------
    # 6. Save (the moving average with --use_ema), model card, samples from the saved file, exports
    # -----------------------------------------------------------------------------------------
    adapter_path, model, global_step = output_dir / "adapter.safetensors", plan.model, plan.global_step
    session.gather_adapter(accelerator, model, adapter, denoiser, sharded)  # every process
    if is_main:
        with averaged():
            adapter_path, diffusers_name, _ = session.save_trained_adapter(
                accelerator.unwrap_model(model), output_dir, base_model, model_info.family)
        sample_prompts = validation.prompts or [examples[0].caption]
        if not validation.skip_final_inference:
            del pipeline, family, data, model, denoiser, validate, ema  # before the fresh pipeline loads
        sample_names = session.sample_saved_adapter(base, weight_dtype, accelerator, adapter_path,
                                                    sample_prompts, validation, seed=seed,
                                                    resolution=resolution, step=global_step,
                                                    base_adapters=base_adapters)
        batch, precision = plan.micro_batch * plan.accumulation, accelerator.mixed_precision
        bucket_counts = buckets.describe_counts(example_buckets) if example_buckets else "off"
        write_model_card(
            output_dir, base_model=base_model, family=model_info.family, method=spec.method,
            options={k: v for k, v in adapter.config.to_dict().items() if k != "targets"},
            task="text-to-image",
            targets=adapter.config.targets, trainable_parameters=trainable_count, steps=global_step,
            instance_prompt=sample_prompts[0], sample_images=sample_names, sample_prompt=sample_prompts[0],
            diffusers_weight_name=diffusers_name,
            training={"images": len(examples), "resolution": resolution, "aspect buckets": bucket_counts,
                      "caption prefix": args.caption_prefix, "caption dropout": args.caption_dropout,
                      "batch size (global)": batch, "learning rate": plan.learning_rate,
                      "lr scheduler": args.lr_scheduler, "EMA decay": args.use_ema and args.ema_decay,
                      "mixed precision": precision, "seed": seed})
        session.export_saved_adapter(adapter_path, export, base_model, sample_prompts[0], validation,
                                     seed=seed, resolution=resolution)
        session.write_summary(output_dir, device, adapter_path, started=started, loop_seconds=loop_seconds,
                              steps_run=global_step - first_step, method=spec.method,
                              trainable_parameters=trainable_count, steps=global_step, seed=seed,
                              resolution=resolution, batch_size=batch, mixed_precision=precision,
                              examples=len(examples), use_ema=args.use_ema)
    model = plan = None  # the DDP wrapper goes before the process group (loop.end_training)
    loop.end_training(accelerator)
    return adapter_path


if __name__ == "__main__":
    run_main(main)
