"""Text-encoder training (``--train_text_encoder``): adapters on the family's text encoders.

As in diffusers' DreamBooth scripts, the adapter goes on the attention projections of the text
encoders the model family trains (SD 1.x/2.x's and SDXL's CLIP encoders: ``q_proj``, ``k_proj``,
``v_proj``, ``out_proj``; `ModelFamily.text_encoder_targets`), with the same method and options as
the denoiser's and a learning rate of its own. A frozen encoder gives "a sks dog" nearly the
embedding of "a dog", so the denoiser alone can hardly tell the subject from its class; training
the encoder gives the identifier a meaning of its own. The adapters are saved in the denoiser's
file under their component names (``text_encoder.``, ``text_encoder_2.``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..api import AdapterSpec
from ..errors import DifftuneError
from ..families import family_of


def attach_text_encoder_adapters(pipeline: Any, spec: AdapterSpec) -> dict[str, nn.Module]:
    """The adapter of ``spec`` (whose targets name text-encoder modules, e.g. the family's
    ``text_encoder_targets``) on every trainable text encoder of the pipeline, trainable parameters in
    fp32; returns the adapted encoders by component name."""
    from diffusers.training_utils import cast_training_params

    names = family_of(pipeline).trainable_text_encoders
    encoders = {name: getattr(pipeline, name, None) for name in names}
    encoders = {name: encoder for name, encoder in encoders.items() if isinstance(encoder, nn.Module)}
    if not encoders:
        raise DifftuneError("--train_text_encoder: the pipeline has no text encoder difftune can train")
    for encoder in encoders.values():
        spec.attach(encoder)
        cast_training_params(encoder, torch.float32)
    return encoders
