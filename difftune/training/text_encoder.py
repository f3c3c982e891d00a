"""Text-encoder training (``--train_text_encoder``): adapters on the CLIP text encoders.

As in diffusers' DreamBooth scripts, the adapter goes on the attention projections
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) of every CLIP text encoder, with the
same method and options as the denoiser's and a learning rate of its own. A frozen
encoder gives "a sks dog" nearly the embedding of "a dog", so the denoiser alone can
hardly tell the subject from its class; training the encoder gives the identifier a
meaning of its own. The adapters are saved in the denoiser's file under their component
names (``text_encoder.``, ``text_encoder_2.``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import AdapterSpec
from ..errors import DifftuneError

TEXT_ENCODER_TARGETS = r"(.*\.)?self_attn\.(q_proj|k_proj|v_proj|out_proj)"
CLIP_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TRAINABLE_FAMILIES = ("sd", "sdxl")


def check_text_encoder_training(family: str, flag: str = "--train_text_encoder") -> None:
    """SD 1.x/2.x and SDXL only: SD3's T5 encoder is not covered (yet). ``flag``: the option that asks
    for it (--train_token_embedding trains the CLIP encoders' token embeddings)."""
    if family not in TRAINABLE_FAMILIES:
        raise DifftuneError(f"{flag} supports SD 1.x/2.x and SDXL (CLIP text encoders); "
                            f"the base model is {family}")


def attach_text_encoder_adapters(pipeline: Any, spec: AdapterSpec) -> dict[str, nn.Module]:
    """The adapter of ``spec`` (whose targets name text-encoder modules, e.g. `TEXT_ENCODER_TARGETS`)
    on every CLIP text encoder of the pipeline, trainable parameters in fp32; returns the adapted
    encoders by component name."""
    from diffusers.training_utils import cast_training_params

    encoders = {name: getattr(pipeline, name, None) for name in CLIP_TEXT_ENCODERS}
    encoders = {name: encoder for name, encoder in encoders.items() if isinstance(encoder, nn.Module)}
    if not encoders:
        raise DifftuneError("--train_text_encoder: the pipeline has no CLIP text encoder")
    for encoder in encoders.values():
        spec.attach(encoder)
        cast_training_params(encoder, torch.float32)
    return encoders
