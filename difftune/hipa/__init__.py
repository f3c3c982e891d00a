"""HiPA: one-step text-to-image generation by adapting a frozen model with a high-frequency-promoting loss.

* `loss`: the spatial, Fourier high-pass and Sobel-edge terms and `HiPALoss` combining them;
* `one_step`: x̂0 from pure noise in one denoiser call (ε, v, flow matching) and
  `generate_one_step` for standard pipelines;
* `teacher`: the base model's multi-step samples from stored noise, cached resumably;
* `evaluation`: student vs base one-step vs teacher on the same noise, with metrics.

The trainer is ``difftune train-one-step`` (difftune/commands/train_one_step.py).
"""

from .evaluation import Comparison, OneStepMetrics, compare_with_teacher, evaluate_comparison
from .loss import (
    HiPALoss,
    HiPALossConfig,
    edge_loss,
    fourier_high_frequency_loss,
    high_pass_mask,
    sobel_edges,
    spatial_l2_loss,
)
from .one_step import (
    OneStepTimestep,
    decode_latents,
    generate_one_step,
    one_step_scheduler,
    one_step_timestep,
    predict_x0,
)
from .teacher import TeacherCache, TeacherSettings, generate_teacher_samples, read_prompts

__all__ = [
    "Comparison",
    "HiPALoss",
    "HiPALossConfig",
    "OneStepMetrics",
    "OneStepTimestep",
    "TeacherCache",
    "TeacherSettings",
    "compare_with_teacher",
    "decode_latents",
    "edge_loss",
    "evaluate_comparison",
    "fourier_high_frequency_loss",
    "generate_one_step",
    "generate_teacher_samples",
    "high_pass_mask",
    "one_step_scheduler",
    "one_step_timestep",
    "predict_x0",
    "read_prompts",
    "sobel_edges",
    "spatial_l2_loss",
]
