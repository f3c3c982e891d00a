"""Build diffusers pipelines: tiny random ones offline, or real ones from the hub / disk.

Tests and the offline demo need pipelines that exist without a download. The tiny
builders below make deterministic random models from small configs and an offline
byte-level CLIP tokenizer. `load_pipeline` is the one entry point the scripts use:
it accepts the built-in names (``builtin:tiny-sd``, ``builtin:tiny-sdxl``,
``builtin:tiny-sd3``, ``builtin:embedded``), a hub id or a local folder.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

BUILTIN_PREFIX = "builtin:"
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded_model"

# Denoiser configs of the real architectures, for parameter counts and benchmarks.
# Values follow the public SD 1.5 and SDXL UNet configs.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}


def offline_clip_tokenizer(words: tuple[str, ...] = (), model_max_length: int = 77):
    """A real byte-level BPE CLIP tokenizer built without any download.

    Every byte maps to its own token (plus an end-of-word form), so any text
    tokenizes; each word in ``words`` additionally becomes one whole token, which
    gives small text encoders a useful vocabulary.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for char in alphabet:
            vocab[char + suffix] = len(vocab)
    merges: dict[tuple[str, str], int] = {}
    byte_to_char = dict(zip(range(256), _byte_level_chars(), strict=True))
    for word in dict.fromkeys(w.lower() for w in words):
        chars = [byte_to_char[b] for b in word.encode("utf-8")]
        # Merges of earlier words can interrupt this word's chain, so merge what BPE
        # leaves of it until one token remains. New merges rank after all older ones,
        # which leaves the tokenization of earlier words unchanged.
        pieces = _apply_bpe([*chars[:-1], chars[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.setdefault((pieces[0], pieces[1]), len(merges))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_bpe(pieces, merges)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def _byte_level_chars() -> list[str]:
    """The printable character GPT-2/CLIP byte-level BPE uses for each byte value 0..255."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the adjacent pair of lowest rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        pieces[index:index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces


def _clip_text_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _tiny_vae(latent_channels: int = 4, **extra: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        **extra,
    )


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SD 1.x-layout pipeline (1×1-conv proj_in/proj_out), random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    tokenizer = offline_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny SDXL-layout pipeline: two text encoders, added time ids, linear proj_in."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled 32
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    tokenizer = offline_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=copy.deepcopy(tokenizer),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0):
    """A tiny SD3 pipeline (MMDiT transformer, flow matching); no T5 encoder."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = _tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer = offline_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=None,
        tokenizer=tokenizer,
        tokenizer_2=copy.deepcopy(tokenizer),
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_BUILDERS = {
    "tiny-sd": tiny_sd_pipeline,
    "tiny-sdxl": tiny_sdxl_pipeline,
    "tiny-sd3": tiny_sd3_pipeline,
}


FAMILIES = ("sd", "sdxl", "sd3")


def pipeline_family(pipeline: Any) -> str:
    """``"sd"`` (SD 1.x/2.x), ``"sdxl"`` or ``"sd3"``; a clear error for anything else."""
    from .errors import DifftuneError

    kind = type(pipeline).__name__
    if kind.startswith("StableDiffusionXL"):
        return "sdxl"
    if kind.startswith("StableDiffusion3"):
        return "sd3"
    if kind.startswith("StableDiffusion") and hasattr(pipeline, "unet"):
        return "sd"
    raise DifftuneError(
        f"unsupported base model family: {kind}. Supported: StableDiffusionPipeline (SD 1.x/2.x), "
        "StableDiffusionXLPipeline and StableDiffusion3Pipeline checkpoints"
    )


def load_pipeline(
    name_or_path: str,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
    **kwargs: Any,
):
    """Load a pipeline by built-in name, hub id or local folder.

    Built-in names: ``builtin:tiny-sd``, ``builtin:tiny-sdxl``, ``builtin:tiny-sd3``
    (random, for tests) and ``builtin:embedded`` (the small pretrained model in assets/).
    Anything else goes to ``DiffusionPipeline.from_pretrained`` unchanged, so hub ids,
    revisions and variants behave as in diffusers.
    """
    from .errors import DifftuneError

    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX):]
        if name == "embedded":
            if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
                raise DifftuneError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR}")
            name_or_path = str(EMBEDDED_MODEL_DIR)
        elif name in TINY_BUILDERS:
            pipe = TINY_BUILDERS[name](**kwargs)
            return pipe.to(torch_dtype) if torch_dtype is not None else pipe
        else:
            raise DifftuneError(f"unknown built-in model '{name_or_path}'. Built-ins: "
                                + ", ".join(BUILTIN_PREFIX + n for n in [*TINY_BUILDERS, "embedded"]))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        name_or_path, torch_dtype=torch_dtype, revision=revision, variant=variant, **kwargs
    )
    pipeline_family(pipe)
    return pipe


def build_denoiser_on_meta(config: dict[str, Any]) -> nn.Module:
    """A UNet of the given config with no memory (meta device): for parameter counts."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**config)
