"""What SD 1.x/2.x and SDXL share: a UNet2DConditionModel with DDPM noise, CLIP text encoders that
``--train_text_encoder`` adapts, convolution presets, kohya names and the original (LDM) layout."""

from __future__ import annotations

from typing import Any, ClassVar

from .base import DDPMFamily
from .ldm import component_states, single_file_entries, single_file_state_dict
from .tiny import TINY_SAMPLE_SIZE

# The q/k/v/out projections of every CLIP self-attention: what diffusers' DreamBooth scripts adapt
# in the text encoders (--train_text_encoder).
CLIP_ATTENTION = r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj|out_proj)"

# A UNet's convolutions: the resnets' and the 1x1-conv projections of SD 1.x's attention blocks.
CONV_TERMS = ((r"resnets\.\d+\.(conv1|conv2|conv_shortcut)", "resnet conv1, conv2, conv_shortcut"),
              (r"attentions\.\d+\.(proj_in|proj_out)", "the 1x1-conv proj_in/proj_out"))


# What the tiny UNets of both families share: two levels of 32 and 64 channels.
TINY_UNET_CONFIG: dict[str, Any] = {"block_out_channels": (32, 64), "layers_per_block": 2,
                                    "sample_size": TINY_SAMPLE_SIZE, "in_channels": 4, "out_channels": 4,
                                    "attention_head_dim": (2, 4), "norm_num_groups": 32}


class UNetFamily(DDPMFamily):
    """The base of the Stable Diffusion UNet families."""

    denoiser_component = "unet"
    denoiser_class = "UNet2DConditionModel"
    sample_argument = "sample"
    target_terms = {"conv": CONV_TERMS}
    text_encoder_targets = CLIP_ATTENTION
    pipeline_side_multiple = 8  # StableDiffusion(XL)Pipeline.check_inputs: sides divisible by 8, any VAE
    clip_checkpoint_prefix: ClassVar[str]  # where the single-file checkpoint keeps the CLIP-L encoder

    @classmethod
    def single_file_state_dict(cls, pipeline: Any):
        return single_file_state_dict(pipeline, cls.clip_checkpoint_prefix,
                                      open_clip="text_encoder_2" in cls.text_encoder_components)

    @classmethod
    def single_file_states(cls, pipeline: Any):
        return component_states(pipeline, open_clip="text_encoder_2" in cls.text_encoder_components)

    @classmethod
    def single_file_entries(cls, pipeline: Any, states=None, replace=None):
        return single_file_entries(pipeline, cls.clip_checkpoint_prefix,
                                   "text_encoder_2" in cls.text_encoder_components, states, replace)

