"""The trainers' settings as small frozen dataclasses: what the library functions of
``difftune.training`` take instead of the whole command line, and the one definition of each
shared trainer flag.

Each field made with `difftune.options.option` is a flag of the same name (``max_grad_norm`` is
``--max_grad_norm``) with its default, help, choices and `Check`; ``training/arguments.py`` builds
the trainers' parsers from these fields, and `arguments.settings_from_args` builds the settings from
the parsed flags, so a parser and its settings cannot drift apart. A class's ``flag_group`` is the
section of ``--help`` and ``docs/training.md`` its flags are listed in (a field may name another).
A plain field (no `option`) has its flag defined by another class: ``LossOptions.prediction_type``
is filled from ``ModelSettings``' ``--prediction_type``.

Settings built in code pass the same checks as flags (`CheckedSettings`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar

from ..errors import DifftuneError
from ..families import EXPORT_FORMATS, FAMILIES
from ..model_factory import builtin_names
from ..options import (  # DTYPES, PRECISIONS: the trainers read them here
    DTYPES,  # noqa: F401
    PRECISIONS,  # noqa: F401
    Check,
    CheckedSettings,
    at_least,
    in_range,
    non_negative,
    option,
    positive,
)
from ..sampling import GenerationSettings
from ..tuners import METHODS

# --quantize_base values and the diffusers quantization backends that load them
QUANTIZATION_BACKENDS = {"8bit": "bitsandbytes_8bit", "4bit": "bitsandbytes_4bit"}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                 "polynomial")
REPORT_TO = ("tensorboard", "wandb", "comet_ml", "all", "none")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
# Above this AdamW's update overflows float32 or wrecks any adapter within a step or two.
MAX_LEARNING_RATE = 1.0


def quantizable_methods() -> list[str]:
    """The methods that train on a quantised base (`Adapter.quantized_base_refusal` is empty)."""
    return sorted(name for name, each in METHODS.items() if not each.quantized_base_refusal)


def _model_help() -> str:
    builtins = sorted(builtin_names(), key=lambda name: "tiny" in name)  # the embedded model first
    families = ", ".join(family.title for family in FAMILIES.values())
    return (f"base model: a built-in name ({', '.join(builtins)}), a hub id or a local pipeline folder "
            f"({families})")


def _quantize_help() -> str:
    return ("load the frozen denoiser weights in 8-bit or 4-bit (NF4) through bitsandbytes (CUDA; "
            f"--adapter {'/'.join(quantizable_methods())} only: the others need the dense base weights)")


@dataclasses.dataclass(frozen=True)
class ModelSettings(CheckedSettings):
    """Which base model to load, and how."""

    flag_group: ClassVar[str] = "model"

    pretrained_model_name_or_path: str = option("builtin:embedded", _model_help)
    revision: str | None = option(None, "hub revision of the base model")
    variant: str | None = option(None, "weight variant of the base model, e.g. fp16")
    # also set on the scheduler of pipelines that sample the saved adapter
    prediction_type: str | None = option(None, "override the scheduler's prediction type (default: the "
                                               "model's own)", choices=("epsilon", "v_prediction"))
    quantize_base: str | None = option(None, _quantize_help, choices=tuple(QUANTIZATION_BACKENDS),
                                       group="precision and memory")
    quantize_text_encoder: str | None = option(
        None, "load the frozen text encoders in 8-bit or 4-bit (NF4) through bitsandbytes (CUDA): "
              "FLUX.2-dev's 24B Mistral, Qwen-Image's 7B Qwen2.5-VL; the same value as --quantize_base "
              "when both are given; not with --train_text_encoder / --train_token_embedding",
        choices=tuple(QUANTIZATION_BACKENDS), group="precision and memory")


def split_base_adapter(text: str) -> tuple[str, float]:
    """A ``--base_adapter`` value, ``PATH[:WEIGHT]``: the file and its weight (1 when none is given; a
    colon not followed by a number belongs to the path)."""
    path, colon, weight = text.rpartition(":")
    if not colon or not path:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        return text, 1.0
    if not math.isfinite(value):
        raise DifftuneError(f"--base_adapter {text}: the weight must be a finite number")
    return path, value


def _base_adapter_value(text: str) -> str:
    split_base_adapter(text)  # a bad weight is the flag's error
    return text


@dataclasses.dataclass(frozen=True)
class AdapterSettings(CheckedSettings):
    """The trained method and its layers (each method's own options are flags generated from its config,
    `arguments.add_method_arguments`), and the frozen adapters it trains on top of."""

    flag_group: ClassVar[str] = "adapter"

    adapter: str = option("lora", "adapter method to train", choices=lambda: sorted(METHODS))
    targets: list[str] | None = option(None, "layers to adapt: presets attn, attn-ff, conv, all, regexes on "
                                             "module names or module names; several are united (default: "
                                             "the method's default)")
    base_adapter: list[str] = option(
        [], "train on top of this adapter file, frozen at WEIGHT (default 1), any method; give the flag "
            "again for more (attached in order, before the trained adapter). The trained file records them, "
            "and loading it without them warns (docs/adapter-sets.md)",
        parse=_base_adapter_value, repeat=True, metavar="PATH[:WEIGHT]")

    @property
    def base_adapters(self) -> list[tuple[str, float]]:
        """``--base_adapter`` as (path, weight) pairs."""
        return [split_base_adapter(text) for text in self.base_adapter]


@dataclasses.dataclass(frozen=True)
class OptimizerSettings(CheckedSettings):
    """Batch geometry, step count, AdamW and learning-rate schedule, and gradient clipping; and the seed
    of the run (`loop.resolve_seed`)."""

    flag_group: ClassVar[str] = "optimization"

    seed: int | None = option(None, "seed of everything random (default: drawn at random, printed and stored "
                                    "in checkpoints so a resumed run continues with it)",
                              check=Check(lambda value: 0 <= value < 2**32,  # all NumPy generators take
                                          "must be in [0, 2**32)"))
    train_batch_size: int = option(1, "batch size per process", check=at_least(1))
    num_train_epochs: int = option(1, "epochs to train when --max_train_steps is not given",
                                   check=at_least(1))
    max_train_steps: int | None = option(None, "optimizer steps to train (overrides epochs)",
                                         check=at_least(1))
    gradient_accumulation_steps: int = option(1, "micro-batches accumulated per optimizer step",
                                              check=at_least(1))
    # None: the method's own rule, else loop.DEFAULT_LEARNING_RATE
    learning_rate: float | None = option(
        None, "peak learning rate (default: the method's own rule, else 1e-4)",
        check=in_range(0, MAX_LEARNING_RATE, low_open=True,
                       why="AdamW moves every parameter by about this much per step"))
    scale_lr: bool = option(False, "multiply the learning rate by batch size x processes x accumulation "
                                   "steps")
    lr_scheduler: str = option("constant", "learning-rate schedule (diffusers.optimization.get_scheduler)",
                               choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "linear warm-up steps", check=non_negative())
    lr_num_cycles: int = option(1, "restarts of cosine_with_restarts", check=at_least(1))
    lr_power: float = option(1.0, "power of the polynomial schedule")
    use_8bit_adam: bool = option(False, "8-bit AdamW from bitsandbytes")
    # AdamW's own ranges, checked before the model loads (torch checks them only when the optimizer is
    # built, after loading, with a traceback)
    adam_beta1: float = option(0.9, "AdamW beta1", check=in_range(0, 1, high_open=True))
    adam_beta2: float = option(0.999, "AdamW beta2", check=in_range(0, 1, high_open=True))
    adam_weight_decay: float = option(1e-2, "AdamW weight decay", check=non_negative())
    adam_epsilon: float = option(1e-8, "AdamW epsilon", check=positive())
    max_grad_norm: float = option(1.0, "clip the gradient norm to this value (0 disables clipping)",
                                  check=non_negative())


@dataclasses.dataclass(frozen=True)
class MemorySettings(CheckedSettings):
    """Memory and speed options applied to the denoiser once its adapter is attached."""

    flag_group: ClassVar[str] = "precision and memory"

    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory",
                                          group="optimization")
    enable_xformers_memory_efficient_attention: bool = option(
        False, "xformers attention instead of PyTorch SDPA (the default)")
    compile: bool = option(
        False, "torch.compile the denoiser after the adapter is attached: only its repeated blocks where "
               "diffusers lists them (regional compilation), else the whole model; the first steps pay the "
               "compile time")
    compile_backend: str = option("inductor", "torch.compile backend for --compile (inductor; aot_eager and "
                                              "eager trace without generating code, for checks)")


@dataclasses.dataclass(frozen=True)
class AcceleratorSettings(CheckedSettings):
    """The Accelerator's precision, tracker and logging folder (relative to the output folder)."""

    flag_group: ClassVar[str] = "precision and memory"

    mixed_precision: str | None = option(
        None, "base weights in fp16/bf16, trainable parameters kept in fp32 (default: accelerate's setting, "
              "'no' without one); the VAE always runs in fp32", choices=MIXED_PRECISIONS)
    report_to: str = option("tensorboard", "experiment tracker for losses and images", choices=REPORT_TO,
                            group="logging")
    logging_dir: str = option("logs", "tracker folder, relative to --output_dir", group="logging")
    allow_tf32: bool = option(False, "allow TF32 matmuls on Ampere+ GPUs")
    tracker_project_name: str = option("difftune-subject", "tracker run name", group="logging")


@dataclasses.dataclass(frozen=True)
class CheckpointSettings(CheckedSettings):
    """Where a run writes, how often it saves a resumable checkpoint, and what it resumes."""

    flag_group: ClassVar[str] = "checkpoints"

    output_dir: Path = option("outputs/subject", "where the adapter, checkpoints, samples, logs and model "
                                                 "card go")
    # Longer than the recipes' subject runs (400-600 steps), so those write no checkpoint they never use;
    # long runs (the one-step recipe's 4800 steps) still save every 1000.
    checkpointing_steps: int = option(
        1000, "save a resumable checkpoint (adapter, optimizer state, RNGs) every N optimizer steps; the "
              "default leaves runs of up to 1000 steps (the recipes' 400-600) without one, as redoing them "
              "costs about what checkpointing them would", check=at_least(1))
    checkpoints_total_limit: int | None = option(None, "keep at most this many checkpoints (oldest removed)",
                                                 check=at_least(1))
    resume_from_checkpoint: str | None = option(
        None, "a checkpoint folder, or 'latest' for the newest one in --output_dir (starts fresh when there "
              "is none)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class ImageSettings(CheckedSettings):
    """How a trainer's images become training examples: the crop, flips, and the latent cache."""

    flag_group: ClassVar[str] = "data"

    center_crop: bool = option(False, "centre crop instead of a random crop")
    random_flip: bool = option(False, "flip images horizontally at random")
    cache_latents: bool = option(True, "encode every image once before training (a random crop is then drawn "
                                       "once per image; flips are cached both ways)")


EXPORT_GROUP = "export (difftune export; docs/export.md)"


@dataclasses.dataclass(frozen=True)
class AdapterFiles(CheckedSettings):
    """The file the adapter starts from, and the other formats it is also written in."""

    flag_group: ClassVar[str] = "start from a file"

    init_adapter: str | None = option(
        None, "train on from this adapter file instead of a fresh adapter: a difftune file of the --adapter "
              "method, or a LoRA file of kohya / A1111 / ComfyUI / diffusers (imported as a difftune LoRA); "
              "the file's rank, targets and options replace the flags", metavar="PATH")
    export: list[str] = option(
        [], "also write the adapter in these formats next to adapter.safetensors: kohya (ComfyUI/A1111 "
            "LoRA), comfyui (the LoRA names ComfyUI maps for the model family), diff, diffusers (merged "
            "folder), single-file (merged checkpoint); a format the model family has no use for is refused "
            "before training", choices=EXPORT_FORMATS, group=EXPORT_GROUP)
    export_rank: int | None = option(None, "SVD rank of a kohya/comfyui export of a non-LoRA adapter",
                                     check=at_least(1), group=EXPORT_GROUP)
    export_energy: float | None = option(None, "or: per-layer energy (fraction of ‖ΔW‖²) of that SVD "
                                               "extraction", group=EXPORT_GROUP)


@dataclasses.dataclass(frozen=True)
class ValidationSettings(CheckedSettings):
    """A trainer's samples: during training every ``validation_steps``, and at the end (the dataset
    trainer's `ValidationPrompts` takes several prompts)."""

    flag_group: ClassVar[str] = "validation"

    validation_prompt: str | None = option(None, "prompt sampled every --validation_steps (default: none "
                                                 "during training; the final samples then use the instance "
                                                 "prompt)")
    num_validation_images: int = option(4, "images per validation", check=at_least(1))
    validation_steps: int = option(100, "validate every N optimizer steps", check=at_least(1))
    validation_inference_steps: int = option(25, "sampler steps", check=at_least(1))
    validation_guidance_scale: float | None = option(None, "classifier-free guidance (default: the "
                                                           "pipeline's own)")
    skip_final_inference: bool = option(False, "do not reload the saved adapter into a fresh pipeline for "
                                               "final samples")

    @property
    def prompts(self) -> list[str]:
        """The validation prompts as a list (empty without any)."""
        prompt = self.validation_prompt
        if not prompt:
            return []
        return [prompt] if isinstance(prompt, str) else list(prompt)

    def generation(self, seed: int, resolution: int) -> GenerationSettings:
        """How the samples are drawn (`validation.generate_images`): square, one image per pipeline
        call, the pipeline's own guidance unless --validation_guidance_scale is given."""
        return GenerationSettings(images_per_prompt=self.num_validation_images, seed=seed,
                                  num_inference_steps=self.validation_inference_steps,
                                  guidance_scale=self.validation_guidance_scale, height=resolution,
                                  width=resolution, batch_size=1)
