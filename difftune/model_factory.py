"""Load diffusers pipelines: the tiny built-ins, the embedded model, hub ids and local folders.

`load_pipeline` is the one entry point the scripts use; `describe_model` reads what a trainer must
know before loading (family, native resolution, denoiser config) from configs alone. Both ask the
model families (`difftune.families`): a name ``builtin:tiny-<family>`` builds that family's tiny
random pipeline offline, ``builtin:embedded`` is the small pretrained model in assets/, and anything
else goes to diffusers' ``from_pretrained`` and must be a pipeline of a registered family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DifftuneError
from .families import family_of, family_of_class, tiny_builtins
from .families.base import ModelDescription
from .families.tiny import offline_clip_tokenizer, offline_t5_tokenizer  # noqa: F401 (public)
from .paths import ASSETS_DIR

BUILTIN_PREFIX = "builtin:"
EMBEDDED_MODEL_DIR = ASSETS_DIR / "embedded_model"


def describe_model(name_or_path: str, revision: str | None = None) -> ModelDescription:
    """Family and native resolution from configs only (no weights are read).

    Lets scripts refuse an unsupported model, or flags that do not fit its family,
    before the heavy loading starts.
    """
    tiny = _tiny_name(name_or_path)
    if tiny is not None:
        family = tiny_builtins()[tiny]
        return family.describe_tiny(family.tiny_options(tiny))
    location = _resolve_builtin(name_or_path)
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(location, revision=revision)
    except Exception as err:  # hub, network and file errors all mean the same to the user
        raise DifftuneError(f"cannot read model_index.json of '{name_or_path}': "
                            f"{_first_line(err)}{offline_hint(location)}") from None
    family = family_of_class(index.get("_class_name", "?"))
    subfolder = family.denoiser_component
    try:
        denoiser_config = getattr(diffusers, family.denoiser_class).load_config(
            location, subfolder=subfolder, revision=revision)
        vae_config = diffusers.AutoencoderKL.load_config(location, subfolder="vae", revision=revision)
    except Exception as err:
        raise DifftuneError(f"cannot read the {subfolder}/vae configs of '{name_or_path}': "
                            f"{_first_line(err)}{offline_hint(location)}") from None
    vae_scale_factor = family.vae_scale_factor(vae_config)
    return ModelDescription(family.name, family.native_resolution(denoiser_config, vae_scale_factor),
                            family.denoiser_class, dict(denoiser_config),
                            family.side_multiple(denoiser_config, vae_scale_factor),
                            family.vae_width(vae_config), family.model_experts(index),
                            family.frame_multiple(vae_config))


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
    """``tiny-sd`` for ``builtin:tiny-sd`` and the other families' tiny built-ins; None otherwise."""
    name = name_or_path.removeprefix(BUILTIN_PREFIX)
    return name if name_or_path.startswith(BUILTIN_PREFIX) and name in tiny_builtins() else None


def builtin_names() -> list[str]:
    """Every built-in model name: each family's tiny model, and the embedded one."""
    return [BUILTIN_PREFIX + name for name in [*tiny_builtins(), "embedded"]]


def _resolve_builtin(name_or_path: str) -> str:
    """Map ``builtin:embedded`` to its folder; other names pass unchanged."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX):]
    if name == "embedded":
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            raise DifftuneError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR}")
        return str(EMBEDDED_MODEL_DIR)
    raise DifftuneError(f"unknown built-in model '{name_or_path}'. Built-ins: " + ", ".join(builtin_names()))


def load_pipeline(
    name_or_path: str,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
    **kwargs: Any,
):
    """Load a pipeline by built-in name, hub id or local folder.

    Built-in names: ``builtin:tiny-<family>`` (random, for tests: `builtin_names`) and
    ``builtin:embedded`` (the small pretrained model in assets/). Anything else goes to
    ``DiffusionPipeline.from_pretrained`` unchanged, so hub ids, revisions and variants behave as
    in diffusers; a pipeline of no registered family is refused.
    """
    tiny = _tiny_name(name_or_path)
    if tiny is not None:
        family = tiny_builtins()[tiny]
        pipe = family.build_tiny(**{**family.tiny_options(tiny), **kwargs})
        return pipe.to(torch_dtype) if torch_dtype not in (None, torch.float32) else pipe  # built in fp32
    name_or_path = _resolve_builtin(name_or_path)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(  # diffusers' name for torch_dtype is dtype now
        name_or_path, dtype=torch_dtype, revision=revision, variant=variant, **kwargs
    )
    family_of(pipe)
    return pipe


def build_denoiser_on_meta(config: dict[str, Any], class_name: str) -> nn.Module:
    """A denoiser of the given config with no memory (meta device): for parameter counts
    and for checking adapter targets before any weights are loaded."""
    import diffusers

    model_class = getattr(diffusers, class_name)
    with torch.device("meta"):
        return model_class.from_config(config)
