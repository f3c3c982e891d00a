"""Build diffusers pipelines: tiny random ones offline, or real ones from the hub / disk.

Tests and the offline demo need pipelines that exist without a download. The tiny
builders below make deterministic random models from small configs and an offline
byte-level CLIP tokenizer. `load_pipeline` is the one entry point the scripts use:
it accepts the built-in names (``builtin:tiny-sd``, ``builtin:tiny-sdxl``,
``builtin:tiny-sd3``, ``builtin:tiny-flux``, ``builtin:embedded``), a hub id or a local folder.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .paths import ASSETS_DIR

BUILTIN_PREFIX = "builtin:"
TINY_SAMPLE_SIZE = 32  # latent size of every tiny denoiser
EMBEDDED_MODEL_DIR = ASSETS_DIR / "embedded_model"

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

# The public FLUX.1-dev transformer config (schnell: the same without the guidance embedding).
FLUX_DEV_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
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
        block_out_channels=(TINY_VAE_WIDTH, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        **extra,
    )


# Denoisers of the tiny built-in pipelines: (diffusers class, config).
TINY_DENOISERS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-sd": ("UNet2DConditionModel", {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": TINY_SAMPLE_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
        "norm_num_groups": 32,
    }),
    "tiny-sdxl": ("UNet2DConditionModel", {
        "block_out_channels": (32, 64),
        "layers_per_block": 2,
        "sample_size": TINY_SAMPLE_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 2),
        "projection_class_embeddings_input_dim": 80,  # 6 time ids * 8 + pooled 32
        "cross_attention_dim": 64,
        "norm_num_groups": 32,
    }),
    "tiny-sd3": ("SD3Transformer2DModel", {
        "sample_size": TINY_SAMPLE_SIZE,
        "patch_size": 1,
        "in_channels": 4,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "caption_projection_dim": 32,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "out_channels": 4,
    }),
    # FLUX.1-dev's layout (joint and single blocks, guidance embedding); the pipeline packs
    # 2x2 patches of the 4-channel latent, hence 16 input channels.
    "tiny-flux": ("FluxTransformer2DModel", {
        "patch_size": 1,
        "in_channels": 16,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 4, 8),
    }),
}


def _tiny_denoiser(name: str) -> nn.Module:
    import diffusers

    class_name, config = TINY_DENOISERS[name]
    return getattr(diffusers, class_name)(**config)


def tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SD 1.x-layout pipeline (1×1-conv proj_in/proj_out), random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = _tiny_denoiser("tiny-sd")
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
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _tiny_denoiser("tiny-sdxl")
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
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = _tiny_denoiser("tiny-sd3")
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


def offline_t5_tokenizer(model_max_length: int = 512):
    """A T5 (unigram, SentencePiece-style) tokenizer built without any download.

    Every printable ASCII character is a piece, alone and word-initial (``▁a``), so any
    English text tokenizes into distinct ids; other characters map to ``<unk>``.
    """
    from transformers import T5TokenizerFast

    pieces = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + p, -3.0) for p in pieces] + [(p, -4.0) for p in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_flux_pipeline(seed: int = 0):
    """A tiny FLUX.1-dev-layout pipeline: CLIP + T5 encoders, packed latents, guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = _tiny_denoiser("tiny-flux")
    vae = _tiny_vae(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                    use_post_quant_conv=False)
    tokenizer = offline_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    tokenizer_2 = offline_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id))
    # FLUX.1-dev's scheduler: resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_BUILDERS = {
    "tiny-sd": tiny_sd_pipeline,
    "tiny-sdxl": tiny_sdxl_pipeline,
    "tiny-sd3": tiny_sd3_pipeline,
    "tiny-flux": tiny_flux_pipeline,
}


FAMILIES = ("sd", "sdxl", "sd3", "flux")
TINY_FAMILIES = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
TINY_VAE_SCALE_FACTOR = 2  # the tiny VAE has two blocks: it halves the size
TINY_VAE_WIDTH = 32  # channels of its first block
TINY_RESOLUTION = TINY_SAMPLE_SIZE * TINY_VAE_SCALE_FACTOR


def family_of_class(class_name: str, has_unet: bool = True) -> str:
    """``"sd"`` (SD 1.x/2.x), ``"sdxl"``, ``"sd3"`` or ``"flux"`` for a pipeline class name; refuse others."""
    from .errors import DifftuneError

    if class_name == "FluxPipeline":  # FLUX.1-dev / schnell text-to-image (not Fill, Kontext, ...)
        return "flux"
    if class_name.startswith("StableDiffusionXL"):
        return "sdxl"
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if class_name.startswith("StableDiffusion") and has_unet:
        return "sd"
    raise DifftuneError(
        f"unsupported base model family: {class_name}. Supported: StableDiffusionPipeline (SD 1.x/2.x), "
        "StableDiffusionXLPipeline, StableDiffusion3Pipeline and FluxPipeline checkpoints"
    )


def pipeline_family(pipeline: Any) -> str:
    """``"sd"`` (SD 1.x/2.x), ``"sdxl"``, ``"sd3"`` or ``"flux"``; a clear error for anything else."""
    return family_of_class(type(pipeline).__name__, hasattr(pipeline, "unet"))


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What a trainer must know about a base model before loading its weights."""

    family: str
    resolution: int  # the native training resolution in pixels
    denoiser_class: str  # diffusers class of the unet / transformer
    denoiser_config: dict[str, Any]
    size_multiple: int  # image sides must be multiples of this (VAE factor x patch size)
    vae_width: int  # channels of the VAE encoder's first block: its activations bound memory from below


def describe_model(name_or_path: str, revision: str | None = None) -> ModelDescription:
    """Family and native resolution from configs only (no weights are read).

    Lets scripts refuse an unsupported model, or flags that do not fit its family,
    before the heavy loading starts.
    """
    from .errors import DifftuneError

    tiny = _tiny_name(name_or_path)
    if tiny is not None:
        class_name, config = TINY_DENOISERS[tiny]
        family = TINY_FAMILIES[tiny]
        return ModelDescription(family, TINY_RESOLUTION, class_name, config,
                                TINY_VAE_SCALE_FACTOR * _latent_patch(family, config), TINY_VAE_WIDTH)
    location = _resolve_builtin(name_or_path)
    from diffusers import (
        AutoencoderKL,
        DiffusionPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    try:
        index = DiffusionPipeline.load_config(location, revision=revision)
    except Exception as err:  # hub, network and file errors all mean the same to the user
        raise DifftuneError(f"cannot read model_index.json of '{name_or_path}': "
                            f"{_first_line(err)}{offline_hint(location)}") from None
    class_name = index.get("_class_name", "?")
    family = family_of_class(class_name, "unet" in index)
    denoiser_class, subfolder = {"sd3": (SD3Transformer2DModel, "transformer"),
                                 "flux": (FluxTransformer2DModel, "transformer")}.get(
        family, (UNet2DConditionModel, "unet"))
    try:
        denoiser_config = denoiser_class.load_config(location, subfolder=subfolder, revision=revision)
        vae_config = AutoencoderKL.load_config(location, subfolder="vae", revision=revision)
    except Exception as err:
        raise DifftuneError(f"cannot read the {subfolder}/vae configs of '{name_or_path}': "
                            f"{_first_line(err)}{offline_hint(location)}") from None
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    patch = _latent_patch(family, denoiser_config)
    if family == "flux":  # no sample_size in its config: the pipeline's default size (1024 px for FLUX.1)
        resolution = FLUX_DEFAULT_SAMPLE_SIZE * vae_scale_factor
    else:
        resolution = int(denoiser_config["sample_size"]) * vae_scale_factor
    return ModelDescription(family, resolution, denoiser_class.__name__, dict(denoiser_config),
                            vae_scale_factor * patch, int(vae_config["block_out_channels"][0]))


FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size, in latent pixels


def _latent_patch(family: str, denoiser_config: dict[str, Any]) -> int:
    """Side of the latent patch one token covers: Flux packs 2x2 latent pixels per token."""
    return 2 if family == "flux" else int(denoiser_config.get("patch_size") or 1)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def offline_hint(location: str | Path) -> str:
    """Why a hub model cannot be read when the hub is switched off: its error only says the file
    is not there, which reads as a wrong model name."""
    from huggingface_hub import constants

    if Path(location).exists() or not constants.HF_HUB_OFFLINE:
        return ""
    return (" (the Hugging Face hub is offline: HF_HUB_OFFLINE is set, so only models already in the "
            "local cache or a local folder can be used)")


def _tiny_name(name_or_path: str) -> str | None:
    """``tiny-sd`` for ``builtin:tiny-sd`` and the other tiny built-ins; None otherwise."""
    name = name_or_path.removeprefix(BUILTIN_PREFIX)
    return name if name_or_path.startswith(BUILTIN_PREFIX) and name in TINY_BUILDERS else None


def _resolve_builtin(name_or_path: str) -> str:
    """Map ``builtin:embedded`` to its folder; other names pass unchanged."""
    from .errors import DifftuneError

    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name == "embedded":
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            raise DifftuneError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR}")
        return str(EMBEDDED_MODEL_DIR)
    raise DifftuneError(f"unknown built-in model '{name_or_path}'. Built-ins: "
                        + ", ".join(BUILTIN_PREFIX + n for n in [*TINY_BUILDERS, "embedded"]))


def load_pipeline(
    name_or_path: str,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
    **kwargs: Any,
):
    """Load a pipeline by built-in name, hub id or local folder.

    Built-in names: ``builtin:tiny-sd``, ``builtin:tiny-sdxl``, ``builtin:tiny-sd3``,
    ``builtin:tiny-flux`` (random, for tests) and ``builtin:embedded`` (the small pretrained
    model in assets/).
    Anything else goes to ``DiffusionPipeline.from_pretrained`` unchanged, so hub ids,
    revisions and variants behave as in diffusers.
    """
    tiny = _tiny_name(name_or_path)
    if tiny is not None:
        pipe = TINY_BUILDERS[tiny](**kwargs)
        return pipe.to(torch_dtype) if torch_dtype is not None else pipe
    name_or_path = _resolve_builtin(name_or_path)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        name_or_path, torch_dtype=torch_dtype, revision=revision, variant=variant, **kwargs
    )
    pipeline_family(pipe)
    return pipe


def build_denoiser_on_meta(config: dict[str, Any], class_name: str = "UNet2DConditionModel") -> nn.Module:
    """A denoiser of the given config with no memory (meta device): for parameter counts
    and for checking adapter targets before any weights are loaded."""
    import diffusers

    model_class = getattr(diffusers, class_name)
    with torch.device("meta"):
        return model_class.from_config(config)
