"""What the subject and dataset trainers do the same way around the training loop: the checks of
the model and adapter before loading, validation samples during training, and what follows the
last step (the adapter file and its diffusers copy, samples drawn from the saved file, exports).

training/loop.py holds the loop itself; this module holds the steps a trainer script would
otherwise write out again, so the two commands (difftune/commands/train_subject.py and
train_text_to_image.py) stay short and read top to bottom.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..api import AdapterSpec, get_adapter, save_adapter
from ..export import LORA_FORMATS, default_output, export_adapter, write_diffusers_lora_files
from ..families import check_capability, check_text_encoder_training, get_family
from ..io import copy_file
from ..model_factory import describe_model
from ..sampling import GenerationSettings, generate_images, save_grid
from . import arguments, checkpointing, loop
from .settings import (
    DTYPES,
    AcceleratorSettings,
    AdapterFiles,
    CheckpointSettings,
    ModelSettings,
    OptimizerSettings,
    ValidationSettings,
)
from .summary import write_train_summary
from .validation import log_images

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
ContextFactory = Callable[[], contextlib.AbstractContextManager]


def check_model_and_adapter(args: argparse.Namespace, script: str,
                            check_family: Callable[[Any, Any], None] | None = None
                            ) -> tuple[Any, AdapterSpec, int]:
    """Every check of the base model, adapter, exports, resolution and output folder that needs no
    weights (bad input fails in seconds); returns (model description, adapter spec, resolution).
    ``check_family(model_info, family)`` adds a trainer's own checks of the model (video, experts)."""
    base = arguments.settings_from_args(args, ModelSettings)
    model_info = describe_model(base.pretrained_model_name_or_path, base.revision)
    family = get_family(model_info.family)
    check_capability(family, "trainable", script)
    arguments.check_family_flags(args, model_info.family)
    if check_family is not None:
        check_family(model_info, family)
    if args.quantize_base:
        check_capability(family, "quantized_base", "--quantize_base")
    for flag in ("train_text_encoder", "train_token_embedding"):
        if getattr(args, flag, False):
            check_text_encoder_training(family, f"--{flag}")
    spec = arguments.adapter_spec(args)  # the adapter's options, checked once
    if args.init_adapter:
        arguments.check_init_adapter(args)
    loop.check_base_adapters(arguments.base_adapters(args))
    arguments.check_export_arguments(args, spec, model_info.family)
    resolution = loop.check_before_loading(spec, base, model_info, args.resolution, Path(args.output_dir),
                                           args.use_8bit_adam)
    return model_info, spec, resolution


def trainer_settings(args: argparse.Namespace, validation: type[ValidationSettings] = ValidationSettings
                     ) -> tuple[ModelSettings, CheckpointSettings, ValidationSettings, AdapterFiles]:
    """The settings every trainer reads from its flags: base model, checkpoints, validation (of the
    trainer's class), the adapter's start file and exports."""
    return tuple(arguments.settings_from_args(args, kind)
                 for kind in (ModelSettings, CheckpointSettings, validation, AdapterFiles))


def resume_point(args: argparse.Namespace, checkpoints: CheckpointSettings, run_settings: dict[str, Any],
                 **more_optimization: Any
                 ) -> tuple[OptimizerSettings, dict[str, Any], Path | None, dict | None]:
    """The optimisation settings, the record of them a checkpoint keeps (with ``more_optimization``,
    e.g. a text encoder's rate), and the checkpoint to resume with its state: refused, naming what
    differs, when it was written by another run (``run_settings``) or with other optimisation
    settings."""
    optimization = arguments.settings_from_args(args, OptimizerSettings)
    record = checkpointing.optimization_record(optimization, **more_optimization)
    path, state = checkpointing.resume_point(checkpoints.output_dir, checkpoints.resume_from_checkpoint)
    if state:
        checkpointing.check_resume_fits(state, run_settings, path)
        checkpointing.check_resume_optimization(state, record, path)
    return optimization, record, path, state


def start_accelerator(args: argparse.Namespace, method: str, family: str, checkpoints: CheckpointSettings,
                      resume_state: dict | None, check_processes: Callable[[Any], None] | None = None
                      ) -> tuple[Any, bool, torch.dtype, int]:
    """The run's accelerator, whether FSDP shards the model (refusing what it cannot: a method that
    writes into the base weights, SaRA; resuming), the weights' dtype and the seed. ``check_processes``
    (the accelerator) refuses first what the trainer cannot do under these processes."""
    accelerator = loop.create_accelerator(arguments.settings_from_args(args, AcceleratorSettings),
                                          checkpoints.output_dir)
    if check_processes is not None:
        check_processes(accelerator)
    sharded = loop.check_fsdp(accelerator, method, checkpoints.resume_from_checkpoint, family)
    return (accelerator, sharded, DTYPES[accelerator.mixed_precision],
            loop.resolve_seed(args.seed, resume_state))


def offload_frozen(modules: Sequence[torch.nn.Module], device: torch.device) -> list[torch.nn.Module]:
    """Move frozen modules whose outputs are cached (text encoders, VAE) off an accelerator until
    validation needs them; returns them (none on a CPU run)."""
    if device.type == "cpu":
        return []
    for module in modules:
        module.to("cpu")
    return list(modules)


# ``save(samples, stem, tag, step) -> names``: a trainer's samples (one list per prompt) written under
# ``stem`` (no suffix) and sent to the trackers; `sample_grid` for images
SaveSamples = Callable[[Sequence[Sequence[Any]], Path, str, int], list[str]]


def sample_grid(images: Sequence[Sequence[Image.Image]], stem: Path, accelerator: Any, tag: str,
                step: int) -> list[str]:
    """One grid of every prompt's images (a row per prompt when there are several; one prompt's
    images near-square) as ``<stem>.png``, sent to the trackers; returns its name."""
    flat = [image for row in images for image in row]
    path = Path(stem).with_suffix(".png")
    save_grid(flat, path, columns=len(images[0]) if len(images) > 1 else None)
    log_images(accelerator, tag, flat, step)
    return [path.name]


class Validator:
    """Samples the validation prompts every ``validation_steps`` into ``validation/step-N.png``.

    The prompts are encoded when it is made: make it before the frozen encoders leave the device,
    and set ``offloaded`` to what `offload_frozen` moved (brought back while sampling). ``reencode``
    encodes the prompts again each time (a trained text encoder or new tokens change them);
    ``weights`` swaps other adapter weights in while sampling (the moving average of --use_ema).
    ``generation`` is how the samples are drawn and ``save`` how they are written (defaults: the
    settings' square images, `sample_grid`; a video model's clips).
    """

    def __init__(self, accelerator: Any, family: Any, settings: ValidationSettings, prompts: Sequence[str], *,
                 seed: int, resolution: int, output_dir: Path, reencode: bool = False,
                 weights: ContextFactory | None = None, generation: GenerationSettings | None = None,
                 save: SaveSamples | None = None):
        self.accelerator, self.family, self.settings = accelerator, family, settings
        self.prompts, self.seed, self.resolution = list(prompts), seed, resolution
        self.output_dir, self.reencode = Path(output_dir), reencode
        self.offloaded: list[torch.nn.Module] = []
        self.weights = weights or contextlib.nullcontext
        self.generation = generation or settings.generation(seed, resolution)
        self.save = save or functools.partial(sample_grid, accelerator=accelerator)
        self.prompt_kwargs = self._encode()

    def _encode(self) -> list[dict[str, torch.Tensor]]:
        return [self.family.pipeline_prompt_kwargs(prompt) for prompt in self.prompts]

    def __call__(self, step: int) -> None:
        if not (self.prompts and step % self.settings.validation_steps == 0
                and self.accelerator.is_main_process):
            return
        from diffusers.training_utils import offload_models

        denoiser = self.family.denoiser
        denoiser.eval()
        if self.reencode:
            self.prompt_kwargs = self._encode()
        device = self.accelerator.device
        with offload_models(*self.offloaded, device=device, offload=bool(self.offloaded)), self.weights():
            images = generate_images(self.family.pipeline, self.prompt_kwargs, self.generation,
                                     show_progress=False, autocast=self.accelerator.autocast())
        denoiser.train()
        self.save(images, self.output_dir / "validation" / f"step-{step:06d}", tag="validation", step=step)


def adapter_digest(model: torch.nn.Module) -> str:
    """A hash of the adapter tensors, to show that every process holds the same adapter."""
    digest = hashlib.sha256()
    for key, tensor in sorted(get_adapter(model).adapter_state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_adapter(accelerator: Any, model: torch.nn.Module, adapter: Any, denoiser: torch.nn.Module,
                   sharded: bool) -> None:
    """After the last step, on every process: whole tensors from FSDP shards, then the check that
    every process holds the same adapter."""
    accelerator.wait_for_everyone()
    if sharded:  # the adapted layers' shards become whole tensors
        loop.gather_sharded_parameters(accelerator.unwrap_model(model), adapter.target_names)
    check_same_adapter(accelerator, denoiser)


def check_same_adapter(accelerator: Any, denoiser: torch.nn.Module) -> None:
    """Under several processes: stop when their adapters differ (a broken synchronisation)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    digests = gather_object([adapter_digest(denoiser)])
    if len(set(digests)) != 1:
        raise RuntimeError(f"the adapters of the {accelerator.num_processes} processes differ: {digests}")
    if accelerator.is_main_process:
        print(f"adapter identical on all {accelerator.num_processes} processes (sha256 {digests[0][:16]})")


def save_trained_adapter(denoiser: torch.nn.Module, output_dir: Path, base_model: str, family: str, *,
                         text_encoders: dict[str, torch.nn.Module] | None = None,
                         token_embeddings: Any = None, several_denoisers: bool = False
                         ) -> tuple[Path, str | None, list[tuple[str, dict[str, Any]]]]:
    """``adapter.safetensors`` and, where diffusers reads it as a LoRA (not with new tokens: a
    diffusers file has no place for them), a copy under diffusers' name, or with
    ``several_denoisers`` (Wan 2.2's experts, in ``text_encoders``) one diffusers file per denoiser;
    returns (the file, the copy's name or None, each diffusers file with its loading arguments)."""
    adapter_path = Path(output_dir) / "adapter.safetensors"
    save_adapter(denoiser, adapter_path, base_model=base_model, text_encoders=text_encoders or {},
                 token_embeddings=token_embeddings)
    family_class = get_family(family)
    diffusers_copy = get_adapter(denoiser).diffusers_lora_file and family_class.diffusers_loads_lora
    if not diffusers_copy or token_embeddings is not None:
        return adapter_path, None, []
    if several_denoisers:  # as diffusers' loader reads them (Wan 2.2: load_into_transformer_2)
        written = write_diffusers_lora_files(adapter_path, output_dir, family_class)
        return adapter_path, None, list(written.items())
    copy_file(adapter_path, Path(output_dir) / DIFFUSERS_LORA_NAME)
    return adapter_path, DIFFUSERS_LORA_NAME, []


def sample_saved_adapter(base: ModelSettings, weight_dtype: torch.dtype, accelerator: Any,
                         adapter_path: Path, prompts: Sequence[str], validation: ValidationSettings, *,
                         seed: int, resolution: int, step: int, generation: GenerationSettings | None = None,
                         save: SaveSamples | None = None,
                         base_adapters: Sequence[tuple[str, float]] = (), offload: bool = False) -> list[str]:
    """``samples.png`` (or what ``save`` writes) drawn by a fresh pipeline that loads the saved file
    (what users get, on top of the ``--base_adapter`` files it was trained on); returns the written
    names (none with --skip_final_inference). Free the training pipeline first. With ``offload``
    (``--offload``) the pipeline is loaded in CPU memory and diffusers' model offload moves each
    component to the device only while it runs, as training did."""
    if validation.skip_final_inference:
        return []
    load_on = torch.device("cpu") if offload else accelerator.device
    fresh = loop.load_base_pipeline(base, weight_dtype, load_on, adapter_path, base_adapters=base_adapters)
    if offload:
        fresh.enable_model_cpu_offload(device=accelerator.device)
    images = generate_images(fresh, list(prompts), generation or validation.generation(seed, resolution),
                             show_progress=False, autocast=accelerator.autocast())
    save = save or functools.partial(sample_grid, accelerator=accelerator)
    return save(images, adapter_path.parent / "samples", tag="final", step=step)


def export_saved_adapter(adapter_path: Path, export: AdapterFiles, base_model: str, prompt: str,
                         validation: ValidationSettings, *, seed: int, resolution: int) -> None:
    """Write the ``--export`` formats next to the adapter and print each one's report."""
    for fmt in export.export:
        lora_format = fmt in LORA_FORMATS
        report = export_adapter(
            adapter_path, default_output(adapter_path, fmt), fmt, base_model=base_model,
            rank=export.export_rank if lora_format else None,
            energy=export.export_energy if lora_format else None,
            psnr_images=0 if validation.skip_final_inference else 2, prompt=prompt,
            num_inference_steps=validation.validation_inference_steps, seed=seed, resolution=resolution)
        print(report.summary())


def write_summary(output_dir: Path, device: torch.device, adapter_path: Path, *, started: float,
                  loop_seconds: float, steps_run: int, **facts: Any) -> None:
    """``train_summary.json`` (the facts, the step time of this run, peak memory) and the last log line."""
    step_time = loop_seconds / max(steps_run, 1)
    write_train_summary(output_dir, device, **facts, steps_this_run=steps_run, step_time_s=step_time)
    print(f"adapter: {adapter_path} | {steps_run} steps in {loop_seconds:.1f} s ({step_time:.3f} s/step), "
          f"{time.perf_counter() - started:.1f} s in all")
