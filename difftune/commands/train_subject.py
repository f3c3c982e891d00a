#!/usr/bin/env python
"""Subject-driven (DreamBooth) training of a difftune adapter (LoRA, SaRA, SVFit, TLoRA, ...).

    difftune train-subject --pretrained_model_name_or_path builtin:embedded \\
        --instance_data_dir builtin:star --instance_prompt "a large sks orange star" \\
        --adapter lora --rank 4 --max_train_steps 400 --output_dir outputs/subject

On several GPUs: `accelerate launch -m difftune train-subject ...`. In a checkout,
`python train_scripts/train_subject.py ...` and `accelerate launch train_scripts/train_subject.py`
run the same. Every option is a flag and may come from a YAML or JSON file given with --config
(flags override the file).

The script reads top to bottom:
  1. options, and every check that needs no model weights (bad input fails in seconds)
  2. the base model, missing class images for prior preservation, the adapter
  3. the training data, with latent and prompt-embedding caches
  4. optimizer, learning-rate schedule and, when asked, the checkpoint to resume
  5. the training loop: checkpoints every --checkpointing_steps, samples every --validation_steps
  6. the adapter (and a diffusers LoRA copy), a model card, and samples from a fresh pipeline
     that loads the saved file
Supported bases: every model family of difftune.families (SD 1.x/2.x with epsilon and v prediction,
SDXL, SD3, FLUX.1 dev and schnell, PixArt-α/Σ, FLUX.2 dev and klein, Qwen-Image, Z-Image, Wan 2.1/2.2
video: a folder of clips, docs/video.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import ClassVar

import torch
from diffusers.training_utils import offload_models

import difftune
from difftune.adapter_file import EXPERTS
from difftune.api import name_component
from difftune.errors import DifftuneError, run_main
from difftune.export import check_experts_export
from difftune.families import LossOptions, check_export_modules, get_family, titles_with
from difftune.model_factory import build_denoiser_on_meta, load_pipeline
from difftune.options import CheckedSettings, at_least, check_values, option, positive
from difftune.paths import subject_folder
from difftune.training import arguments, checkpointing, loop, pivotal, recipes, session, settings
from difftune.training.data import (
    SubjectData,
    SubjectDataset,
    check_writable_folder,
    scan_image_folder,
    warn_small_images,
)
from difftune.training.model_card import write_model_card
from difftune.training.prior import ensure_class_images
from difftune.training.summary import reset_peak_memory
from difftune.training.text_encoder import attach_text_encoder_adapters
from difftune.training.validation import log_images
from difftune.video.data import parse_resolution, warn_small_clips
from difftune.video.training import (
    VideoSettings,
    check_video_flags,
    positive_resolution,
    save_samples,
    video_data,
)

# ---------------------------------------------------------------------------------------------
# 1. Options
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InstanceImages(CheckedSettings):
    """The subject's images, their prompt, and how they become training examples."""

    flag_group: ClassVar[str] = "data"

    instance_data_dir: str | None = option(
        None, "folder of subject images, or a shipped subject: builtin:heart, builtin:star, ... (required)",
        parse=subject_folder)
    instance_prompt: str | None = option(None, "prompt with the identifier, e.g. 'a photo of sks dog' "
                                               "(required; per-image captions replace it)")
    caption_column: str | None = option(None, "metadata.jsonl key of per-image captions (default: text, "
                                              "caption or prompt); a sidecar <image>.txt wins over it")
    resolution: int | tuple[int, int] | None = option(
        None, "training resolution (default: the model's own); video models: a side or height x width, e.g. "
              "480x832", parse=parse_resolution, check=positive_resolution())
    pre_compute_text_embeddings: bool | None = option(
        None, "encode every prompt once before training (default: on, unless --train_text_encoder or "
              "--train_token_embedding: a trained encoder or token must encode every step)")


@dataclasses.dataclass(frozen=True)
class FrozenParts(CheckedSettings):
    """Memory of the frozen VAE and text encoders (the denoiser's: `settings.MemorySettings`)."""

    flag_group: ClassVar[str] = "memory of the frozen parts"

    offload: bool = option(
        False, "keep the VAE and text encoders in CPU memory and move each to the GPU only while it runs "
               "(class images, caching, validation, final samples), as diffusers' --offload (CUDA)")
    free_text_encoder: bool = option(
        False, "once the prompts and --validation_prompt are encoded, drop the text encoders from memory "
               "(FLUX.2-dev's 24B Mistral, Qwen-Image's 7B Qwen2.5-VL); the final samples load them again")


@dataclasses.dataclass(frozen=True)
class PriorPreservation(CheckedSettings):
    """DreamBooth's prior loss on class images of the base model."""

    flag_group: ClassVar[str] = "prior preservation"

    with_prior_preservation: bool = option(False, "add the loss on class images of the base model "
                                                  "(DreamBooth's prior loss)")
    class_data_dir: str | None = option(None, "folder of class images; missing ones are generated and kept")
    class_prompt: str | None = option(None, "prompt of the class, e.g. 'a photo of dog'")
    num_class_images: int = option(100, "class images to use", check=at_least(1))
    prior_loss_weight: float = option(1.0, "weight of the prior loss")
    sample_batch_size: int = option(4, "batch size of class-image generation", check=at_least(1))
    class_inference_steps: int = option(50, "sampler steps per class image", check=at_least(1))
    prior_generation_precision: str | None = option(None, "dtype of class-image generation (default: that of "
                                                          "training)", choices=settings.PRECISIONS)


@dataclasses.dataclass(frozen=True)
class TextEncoderTraining(CheckedSettings):
    """An adapter on the text encoders too, in the same file."""

    flag_group: ClassVar[str] = "text encoder"

    train_text_encoder: bool = option(
        False, lambda: "also train an adapter (same method and options) on the attention of the CLIP text "
                       "encoders, as diffusers' DreamBooth scripts do; saved in the same file "
                       f"({titles_with('trainable_text_encoders')})")
    text_encoder_lr: float | None = option(None, "learning rate of the text-encoder adapter (default: "
                                                 "--learning_rate)", check=positive())
    text_encoder_targets: list[str] | None = option(None, "text-encoder modules to adapt (regex on whole "
                                                          "module names; default: the q/k/v/out projections "
                                                          "of every self-attention)")


# Every flag of this trainer is a field of one of these (the method options aside, generated from the
# registered methods' configs): tests/training/test_flags.py checks that nothing else is a flag.
SETTINGS = (settings.ModelSettings, InstanceImages, settings.ImageSettings, VideoSettings, FrozenParts,
            PriorPreservation,
            TextEncoderTraining, pivotal.TokenEmbeddingSettings, settings.AdapterFiles,
            *arguments.SHARED_SETTINGS)


def build_parser() -> argparse.ArgumentParser:
    parser = arguments.trainer_parser(__doc__, recipes.RECIPES)  # with --config
    arguments.add_model_arguments(parser)
    arguments.add_settings_arguments(parser, InstanceImages, settings.ImageSettings)
    for group in (VideoSettings, FrozenParts, PriorPreservation, TextEncoderTraining):
        arguments.add_settings_arguments(parser, group)
    arguments.add_pivotal_arguments(parser)
    recipes.add_recipe_argument(parser)
    arguments.add_adapter_file_arguments(parser)  # --init_adapter, --export
    arguments.add_training_arguments(parser)  # adapter, optimization, precision, loss, validation, ...
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    tokens = arguments.command_tokens(parser, argv)
    args = parser.parse_args(tokens)
    for name in ("instance_data_dir", "instance_prompt"):
        if not getattr(args, name):
            raise DifftuneError(f"--{name} is required (on the command line or in the --config file)")
    # flags left unset take the measured recipe of this base model and method, if there is one
    args.recipe = recipes.apply_recipe(args, recipes.given_destinations(parser, tokens))
    if args.with_prior_preservation:
        missing = [f"--{n}" for n in ("class_data_dir", "class_prompt") if not getattr(args, n)]
        if missing:
            raise DifftuneError(f"--with_prior_preservation needs {' and '.join(missing)}")
    else:
        given = [f"--{n}" for n in ("class_data_dir", "class_prompt") if getattr(args, n)]
        if given:
            raise DifftuneError(f"{' and '.join(given)} given without --with_prior_preservation: add the "
                                "flag to train with the prior loss, or drop them")
    check_values(args, InstanceImages, settings.ImageSettings, VideoSettings, PriorPreservation)
    if args.train_text_encoder and args.pre_compute_text_embeddings:
        raise DifftuneError("--pre_compute_text_embeddings cannot be used with --train_text_encoder: the "
                            f"encoder changes every step{recipes.source_hint(args, 'train_text_encoder')}")
    if not args.train_text_encoder and args.text_encoder_lr is not None:
        raise DifftuneError("--text_encoder_lr given without --train_text_encoder")
    check_values(args, TextEncoderTraining, settings.AdapterFiles)
    arguments.check_pivotal_arguments(args)
    if args.pre_compute_text_embeddings is None:
        args.pre_compute_text_embeddings = not (args.train_text_encoder or args.train_token_embedding)
    if args.free_text_encoder and not args.pre_compute_text_embeddings:
        raise DifftuneError("--free_text_encoder drops the text encoders once the prompts are encoded: it "
                            "needs --pre_compute_text_embeddings and no --train_text_encoder / "
                            "--train_token_embedding")
    if args.offload and not torch.cuda.is_available():
        raise DifftuneError("--offload moves the VAE and text encoders between CPU and GPU memory; there is "
                            "no CUDA GPU here (on the CPU they already share one memory): drop the flag")
    arguments.check_common_arguments(args)
    return args


def subject_loss(per_example: torch.Tensor, is_prior: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """Mean loss of the subject images, plus the weighted mean loss of the class images."""
    loss = per_example[~is_prior].mean()
    if is_prior.any():
        loss = loss + prior_loss_weight * per_example[is_prior].mean()
    return loss


def check_before_loading(argv: list[str] | None = None):
    """Every check that needs no model weights (bad input fails in seconds): options, model family,
    adapter options and targets, resolution, output folder, instance images (or clips). benchmark.py
    runs it on its trainer flags before its own heavy work. Returns (args, model_info, spec,
    resolution, instance_images); a video model's resolution is (height, width), its images clips."""
    args = parse_args(argv)

    def check_family(model_info, family) -> None:
        check_video_flags(args, family)
        check_experts(args, model_info)
        if args.expert == "both":  # one file of two experts: only the merged pipeline holds both for others
            for fmt in args.export:
                check_experts_export({"component": model_info.experts[0], EXPERTS: model_info.experts[1:]},
                                     fmt, "--expert both")

    model_info, spec, resolution = session.check_model_and_adapter(args, "train_subject.py", check_family)
    family = get_family(model_info.family)
    if args.export:  # a layer the format's tool has no name for (FLUX.2's modulation, ...)
        modules = spec.check(build_denoiser_on_meta(model_info.denoiser_config, model_info.denoiser_class))
        for fmt in args.export:
            check_export_modules(family, fmt, modules, model_info.denoiser_config)
    folder, caption_column = args.instance_data_dir, args.caption_column
    if family.video:  # every clip read through, its frames counted, before loading
        video = video_data(args, model_info, resolution)
        resolution = video.resolution
        instance_images = video.scan(folder, "--instance_data_dir", caption_column)
    else:
        instance_images = scan_image_folder(folder, "--instance_data_dir", caption_column)
    if args.class_data_dir:  # generated class images go there
        check_writable_folder(args.class_data_dir, "--class_data_dir")
    return args, model_info, spec, resolution, instance_images


def check_experts(args: argparse.Namespace, model_info) -> None:
    """--expert needs a model with several experts (Wan 2.2), which train together by default."""
    if not model_info.experts:
        if args.expert not in (None, "high"):
            raise DifftuneError(f"--expert {args.expert}: {args.pretrained_model_name_or_path} has one "
                                "denoiser; --expert picks among the experts of a two-expert model (Wan 2.2)")
        return
    if args.expert is None:
        args.expert = "both"
    if args.expert != "high" and args.init_adapter:
        raise DifftuneError("--init_adapter starts the high-noise expert only; give --expert high with it")


def main(argv: list[str] | None = None) -> Path:
    started = time.perf_counter()
    args, model_info, spec, resolution, instance_images = check_before_loading(argv)
    base, checkpoints, validation, export = session.trainer_settings(args)
    base_model, output_dir = base.pretrained_model_name_or_path, checkpoints.output_dir
    family_class = get_family(model_info.family)
    video = video_data(args, model_info, resolution) if family_class.video else None
    (warn_small_clips if video else warn_small_images)(instance_images, resolution, "--instance_data_dir")
    base_adapters = arguments.base_adapters(args)
    run_settings = {"base_model": base_model, **spec.to_dict(), "train_text_encoder": args.train_text_encoder,
                    "expert": args.expert, "base_adapters": [list(pair) for pair in base_adapters]}
    optimization, optimization_record, resume_path, resume_state = session.resume_point(
        args, checkpoints, run_settings, text_encoder_lr=args.text_encoder_lr)
    if resume_state and resume_state.get("train_token_embedding"):
        raise DifftuneError(f"--resume_from_checkpoint {resume_path}: a pivotal-tuning run "
                            "(--train_token_embedding) cannot be resumed yet")

    def check_processes(accelerator) -> None:  # before any model loads
        for flag in ("train_text_encoder", "train_token_embedding"):
            if getattr(args, flag) and accelerator.num_processes > 1:
                hint = recipes.source_hint(args, flag)
                raise DifftuneError(f"--{flag} runs in one process for now; launch without several "
                                    f"processes, or train the denoiser alone{hint}")
        if args.expert == "both" and accelerator.num_processes > 1:
            raise DifftuneError("--expert both trains two transformers in one process for now; launch one "
                                "run per expert (--expert high, --expert low) on several processes")

    # FSDP: no method that writes into the base weights (SaRA), no intermediate checkpoints
    accelerator, sharded, weight_dtype, seed = session.start_accelerator(args, spec.method, model_info.family,
                                                                         checkpoints, resume_state,
                                                                         check_processes)
    device, is_main = accelerator.device, accelerator.is_main_process

    # -----------------------------------------------------------------------------------------
    # 2. Base model, class images, adapter
    # -----------------------------------------------------------------------------------------
    loss_options = arguments.settings_from_args(args, LossOptions, skip_none=True)
    frozen_parts = arguments.settings_from_args(args, FrozenParts)
    pipeline, family = loop.load_training_model(base, loss_options, weight_dtype, device,
                                                offload=frozen_parts.offload)
    denoiser = family.denoiser
    # --base_adapter: part of the model being fine-tuned from here on (its class images too)
    loop.attach_base_adapters(pipeline, base_adapters)

    def helpers_on_device():
        """--offload: the VAE and text encoders are on the device only inside this context."""
        return offload_models(pipeline.vae, *family.text_encoders, device=device,
                              offload=frozen_parts.offload)

    class_images = []
    if args.with_prior_preservation:
        generation_dtype = settings.DTYPES[args.prior_generation_precision or accelerator.mixed_precision]
        generator_pipeline = pipeline
        if generation_dtype != weight_dtype:
            generator_pipeline = load_pipeline(base_model, torch_dtype=generation_dtype,
                                               revision=base.revision, variant=base.variant).to(device)
            generator_pipeline.set_progress_bar_config(disable=True)
            if base.prediction_type:
                generator_pipeline.scheduler.register_to_config(prediction_type=base.prediction_type)
            loop.attach_base_adapters(generator_pipeline, base_adapters)
        with helpers_on_device() if generator_pipeline is pipeline else contextlib.nullcontext():
            ensure_class_images(generator_pipeline, args.class_data_dir, args.class_prompt,
                                args.num_class_images, seed=seed, resolution=resolution,
                                batch_size=args.sample_batch_size,
                                num_inference_steps=args.class_inference_steps, accelerator=accelerator,
                                autocast=accelerator.autocast(),
                                num_frames=video.sampling.num_frames if video else None)
        del generator_pipeline
        class_images = (video.scan(args.class_data_dir, "--class_data_dir") if video else
                        scan_image_folder(args.class_data_dir, "--class_data_dir"))[:args.num_class_images]

    memory = arguments.settings_from_args(args, settings.MemorySettings)
    trained = family.trained_denoisers()  # the denoiser, and under --expert both the other expert
    for component, module in trained.items():
        name_component(module, component)  # its files and checkpoints name the right transformer
    adapter = loop.attach_trainable_adapter(denoiser, spec, seed, memory, args.init_adapter, pipeline)
    experts = {component: module for component, module in trained.items() if module is not denoiser}
    for offset, module in enumerate(experts.values(), start=1):
        module.requires_grad_(False)
        loop.attach_trainable_adapter(module, spec, seed + offset, memory)
    text_encoders: dict[str, torch.nn.Module] = {}
    if args.train_text_encoder:
        text_encoders = attach_text_encoder_adapters(
            pipeline, spec.with_targets(args.text_encoder_targets or family.text_encoder_targets))
        for encoder in text_encoders.values():
            encoder.train()
    tokens = None  # pivotal tuning: the identifier's new tokens
    if args.train_token_embedding:
        tokens = pivotal.TokenEmbeddingTraining(pipeline, args.identifier, args.num_new_tokens,
                                                args.token_embedding_init, seed,
                                                args.token_embedding_max_norm)

    # -----------------------------------------------------------------------------------------
    # 3. Data
    # -----------------------------------------------------------------------------------------
    dataset = SubjectDataset(instance_images, args.instance_prompt, class_images, args.class_prompt)
    data = SubjectData(
        dataset, encode_images=family.encode_images, encode_prompts=family.encode_prompts,
        resolution=resolution, center_crop=args.center_crop, random_flip=args.random_flip, seed=seed,
        cache_latents=args.cache_latents, cache_prompts=args.pre_compute_text_embeddings, device=device,
        load_pixels=video.loader(args.center_crop) if video else None)
    generation = validation.generation(seed, resolution)  # a video model's: its clip size and length
    generation = video.generation(generation) if video else generation

    def save_and_log(samples, stem: Path, tag: str, step: int) -> list[str]:
        """Samples as a grid (images) or as clips and a frame strip (video); the names written."""
        if not video:
            return session.sample_grid(samples, stem, accelerator, tag, step)
        names, strip = save_samples(samples[0], stem, video.fps)
        log_images(accelerator, tag, [strip], step)
        return names

    with helpers_on_device():  # the validation prompts are encoded now: the encoders may leave below
        data.build_caches(show_progress=is_main)
        validate = session.Validator(accelerator, family, validation, validation.prompts, seed=seed,
                                     resolution=resolution, output_dir=output_dir,
                                     reencode=bool(text_encoders or tokens), generation=generation,
                                     save=save_and_log)
    if frozen_parts.free_text_encoder:  # every prompt is encoded: the encoders are not needed until the end
        family.free_text_encoders()
    # The frozen encoders are not needed on the device between validations.
    validate.offloaded = session.offload_frozen(
        [*(family.text_encoders if args.pre_compute_text_embeddings else []),
         *([pipeline.vae] if args.cache_latents else [])], device)

    # -----------------------------------------------------------------------------------------
    # 4. Optimizer, schedule, resume
    # -----------------------------------------------------------------------------------------
    world = accelerator.num_processes
    further = {**text_encoders, **experts}  # adapted besides the denoiser: optimizer, checkpoints, file
    plan = loop.prepare_optimization(optimization, checkpoints, accelerator, denoiser, adapter, len(dataset),
                                     resume_path, resume_state, device, further, args.text_encoder_lr,
                                     [(tokens, args.token_embedding_lr)] if tokens else ())
    if is_main:
        accelerator.init_trackers(args.tracker_project_name, config=arguments.tracker_config(args))
    max_train_steps, learning_rate = plan.max_train_steps, plan.learning_rate
    micro_batch, accumulation = plan.micro_batch, plan.accumulation

    if is_main:
        if args.recipe:
            print(recipes.describe(args.recipe, base_model, spec.method))
        kind = "clips" if video else "images"
        prior_text = f" + {len(class_images)} class {kind}" if class_images else ""
        resumed = f" | resumed at step {plan.global_step} from {resume_path}" if resume_path else ""
        text_part = "".join(
            f" + {name} {len(difftune.get_adapter(e).target_names)} layers, "
            f"{difftune.count_trainable_parameters(e):,} parameters (lr {plan.text_encoder_lr:g})"
            for name, e in further.items())
        if tokens:
            print(f"pivotal tuning: {tokens.describe()} (lr {args.token_embedding_lr:g})")
        if experts or args.expert:
            print(f"experts: {args.expert} ({', '.join(trained)}, each on its own noise range)")
        size = video.describe() if video else f"{resolution}px"
        print(f"difftune subject training | {base_model} ({model_info.family}, "
              f"{size}, {accelerator.mixed_precision}) | {spec.method} on {adapter.config.targets}: "
              f"{len(adapter.target_names)} layers, {difftune.count_trainable_parameters(denoiser):,} "
              f"trainable parameters{text_part} | {len(instance_images)} instance {kind}{prior_text} | "
              f"{max_train_steps} steps x {micro_batch * accumulation} images (batch {plan.batch_size} x "
              f"{world} processes x {accumulation} accumulation) | lr {learning_rate:g} | "
              f"seed {seed}{loop.describe_base_adapters(base_adapters)}{resumed}")

    trainer_state = {"base_model": base_model, **spec.to_dict(), "seed": seed,
                     "base_adapters": run_settings["base_adapters"],
                     "max_train_steps": max_train_steps, "train_text_encoder": args.train_text_encoder,
                     "expert": args.expert, checkpointing.OPTIMIZATION_KEY: optimization_record,
                     **({"train_token_embedding": True} if tokens else {})}

    # -----------------------------------------------------------------------------------------
    # 5. Training loop
    # -----------------------------------------------------------------------------------------
    def compute_loss(indices: range) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batches = data.batches(indices)  # one batch, or one per clip length
        per_example = torch.cat([loop.diffusion_loss(family, plan.model, batch) for batch in batches])
        is_prior = torch.cat([batch.is_prior for batch in batches])
        return subject_loss(per_example, is_prior, args.prior_loss_weight), {}

    plan.model.train()
    reset_peak_memory(device)
    first_step, loop_started = plan.global_step, time.perf_counter()
    loop.train(accelerator, plan, adapter, denoiser, compute_loss, checkpoints=checkpoints,
               trainer_state=trainer_state, base_model=base_model, text_encoders=further,
               save_checkpoints=not sharded, after_step=validate)
    loop_seconds = time.perf_counter() - loop_started
    trainable_count = sum(difftune.count_trainable_parameters(module) for module in trained.values())

    # -----------------------------------------------------------------------------------------
    # 6. Save, model card, samples from the saved file
    # -----------------------------------------------------------------------------------------
    model, global_step = plan.model, plan.global_step
    session.gather_adapter(accelerator, model, adapter, denoiser, sharded)  # every process
    adapter_path = output_dir / "adapter.safetensors"
    if is_main:
        if tokens:
            tokens.finish()
        adapter_path, diffusers_name, diffusers_loading = session.save_trained_adapter(
            accelerator.unwrap_model(model), output_dir, base_model, model_info.family,
            text_encoders=further, token_embeddings=tokens.file_section() if tokens else None,
            several_denoisers=bool(experts) or trained.keys() != {family_class.denoiser_component})
        sample_prompt = validation.validation_prompt or args.instance_prompt
        if not validation.skip_final_inference:  # freed before the fresh pipeline loads
            del pipeline, family, data, model, denoiser, validate, trained, experts, further
        sample_names = session.sample_saved_adapter(base, weight_dtype, accelerator, adapter_path,
                                                    [sample_prompt], validation, seed=seed,
                                                    resolution=resolution, step=global_step,
                                                    generation=generation, save=save_and_log,
                                                    base_adapters=base_adapters, offload=frozen_parts.offload)
        write_model_card(
            output_dir, base_model=base_model, family=model_info.family, method=spec.method,
            options={k: v for k, v in adapter.config.to_dict().items() if k != "targets"},
            targets=adapter.config.targets,
            trainable_parameters=trainable_count,
            steps=global_step, instance_prompt=args.instance_prompt, sample_images=sample_names,
            sample_prompt=sample_prompt, diffusers_weight_name=diffusers_name,
            video=video is not None, diffusers_loading=diffusers_loading,
            training={"resolution": video.describe() if video else resolution,
                      **({"expert": args.expert} if args.expert else {}),
                      "batch size (global)": micro_batch * accumulation,
                      "learning rate": learning_rate, "lr scheduler": args.lr_scheduler,
                      "mixed precision": accelerator.mixed_precision, "seed": seed,
                      "prior preservation": args.with_prior_preservation,
                      "text encoder": (f"trained, lr {plan.text_encoder_lr:g}" if text_encoders
                                       else "frozen")})
        session.export_saved_adapter(adapter_path, export, base_model, sample_prompt, validation, seed=seed,
                                     resolution=resolution)
        session.write_summary(output_dir, device, adapter_path, started=started, loop_seconds=loop_seconds,
                              steps_run=global_step - first_step, method=spec.method,
                              trainable_parameters=trainable_count, steps=global_step, seed=seed,
                              resolution=resolution, batch_size=micro_batch * accumulation,
                              mixed_precision=accelerator.mixed_precision)
    model = plan = None  # the DDP wrapper goes before the process group (loop.end_training)
    loop.end_training(accelerator)
    return adapter_path


if __name__ == "__main__":
    run_main(main)
