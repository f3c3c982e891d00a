"""The trainers' settings as small frozen dataclasses: what the library functions of
``difftune.training`` take instead of the whole command line.

Each field is named as its flag (``--max_grad_norm`` → ``max_grad_norm``), so a script
builds them with `arguments.settings_from_args` and a reader finds the flag behind a
field at once. Defaults live in the parsers (training/arguments.py), not here: a field
without a default must be given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..options import DTYPES, PRECISIONS  # noqa: F401 (the trainers read them here)
from ..sampling import GenerationSettings

# --quantize_base values and the diffusers quantization backends that load them
QUANTIZATION_BACKENDS = {"8bit": "bitsandbytes_8bit", "4bit": "bitsandbytes_4bit"}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Which base model to load, and how."""

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    prediction_type: str | None = None  # set on the scheduler of pipelines that sample the saved adapter
    quantize_base: str | None = None  # "8bit" / "4bit": the denoiser through bitsandbytes


@dataclasses.dataclass(frozen=True)
class AcceleratorSettings:
    """The Accelerator's precision, tracker and logging folder (relative to the output folder)."""

    mixed_precision: str | None
    report_to: str
    logging_dir: str
    allow_tf32: bool = False


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """Memory options applied to the denoiser once its adapter is attached."""

    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    offload: bool = False  # the VAE and text encoders on the CPU, on the GPU only while they run
    free_text_encoder: bool = False  # the text encoders dropped once the prompts are encoded


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Batch geometry, step count, AdamW and learning-rate schedule, and gradient clipping."""

    train_batch_size: int
    gradient_accumulation_steps: int
    num_train_epochs: int
    max_train_steps: int | None
    learning_rate: float | None  # None: the method's own rule, else loop.DEFAULT_LEARNING_RATE
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    lr_num_cycles: int
    lr_power: float
    use_8bit_adam: bool
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float  # 0: no clipping


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Where a run writes, how often it saves a resumable checkpoint, and what it resumes."""

    output_dir: Path
    checkpointing_steps: int
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """The subject trainer's samples: during training every ``validation_steps``, and at the end."""

    validation_prompt: str | None
    num_validation_images: int
    validation_steps: int
    validation_inference_steps: int
    validation_guidance_scale: float | None = None
    skip_final_inference: bool = False

    def generation(self, seed: int, resolution: int) -> GenerationSettings:
        """How the samples are drawn (`validation.generate_images`): square, one image per pipeline
        call, the pipeline's own guidance unless --validation_guidance_scale is given."""
        return GenerationSettings(images_per_prompt=self.num_validation_images, seed=seed,
                                  num_inference_steps=self.validation_inference_steps,
                                  guidance_scale=self.validation_guidance_scale, height=resolution,
                                  width=resolution, batch_size=1)
