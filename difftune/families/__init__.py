"""The registry of model families: one place that maps a family name, a pipeline class or a built-in
tiny model to the class that knows the family (`difftune.families.base.ModelFamily`).

Each family lives in its own module (SD 1.x/2.x, SDXL, SD3, FLUX.1, PixArt, Wan); registering it here is
all the rest of difftune needs: detection of pipelines and folders, ``builtin:tiny-<name>``, the
target presets, trainer-flag checks, export formats and the contract tests all read the registry.
`register_family` checks what it is given, as peft's ``register_peft_method`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .. import targeting
from ..errors import DifftuneError
from ..registration import check_plugin_class
from .base import (
    OTHER_TASKS,
    DDPMFamily,
    FlowMatchingFamily,
    LoraKeyLayout,
    LossOptions,
    ModelDescription,
    ModelFamily,
    NoisyInput,
    TrainingBatch,
)
from .flux import FluxFamily
from .flux2 import Flux2Family, Flux2KleinFamily
from .pixart import PixArtFamily
from .qwen_image import QwenImageFamily
from .sd import SDFamily
from .sd3 import SD3Family
from .sdxl import SDXLFamily
from .wan import WanFamily
from .z_image import ZImageFamily

FAMILIES: dict[str, type[ModelFamily]] = {}
# what a family class must define (besides the abstract methods), with the type of each
REQUIRED_ATTRIBUTES: dict[str, type | tuple[type, ...]] = {
    "name": str, "title": str, "pipeline_classes": tuple, "denoiser_component": str,
    "denoiser_class": str, "text_encoder_components": tuple, "prompt_outputs": tuple, "process_title": str,
}
EXPORT_FORMATS = ("kohya", "comfyui", "diff", "diffusers", "single-file")


def register_family(family: type[ModelFamily]) -> type[ModelFamily]:
    """Make a family known to every part of difftune by its name; refuses a class that lacks what a
    family must say, or that claims a name, pipeline class or built-in another family has."""
    where = check_plugin_class(family, ModelFamily, "register_family")
    for attribute, kind in REQUIRED_ATTRIBUTES.items():
        if not isinstance(getattr(family, attribute, None), kind):
            raise DifftuneError(f"{where}: class attribute '{attribute}' must be a {kind.__name__}")
    if family.name in FAMILIES:
        raise DifftuneError(f"{where}: a family named '{family.name}' is registered already "
                            f"({FAMILIES[family.name].__name__})")
    for other in FAMILIES.values():
        claimed = set(family.pipeline_classes) & set(other.pipeline_classes)
        if claimed:
            raise DifftuneError(f"{where}: {', '.join(sorted(claimed))} belongs to the '{other.name}' family")
    for fmt in [*family.lora_layouts, *family.export_refusals]:
        if fmt not in EXPORT_FORMATS:
            raise DifftuneError(f"{where}: unknown export format '{fmt}' "
                                f"(formats: {', '.join(EXPORT_FORMATS)})")
    taken = tiny_builtins()
    for name in [family.tiny_name(), *(f"tiny-{variant}" for variant in family.tiny_variants)]:
        if name is not None and name in taken:
            raise DifftuneError(f"{where}: the built-in 'builtin:{name}' belongs to the '{taken[name].name}' "
                                "family")
    unknown = set(family.target_terms) - set(targeting.PRESETS)
    if unknown:
        raise DifftuneError(f"{where}: target_terms for unknown presets {sorted(unknown)}")
    FAMILIES[family.name] = family
    for preset, terms in family.target_terms.items():
        for pattern, label in terms:
            targeting.add_preset_term(preset, pattern, label, family.title)
    return family


def get_family(name: str) -> type[ModelFamily]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise DifftuneError(f"unknown model family '{name}'. Families: {', '.join(FAMILIES)}") from None


def _supported() -> str:
    return ", ".join(f"{' / '.join(f.pipeline_classes)} ({f.title})" for f in FAMILIES.values())


def family_of_class(class_name: str) -> type[ModelFamily]:
    """The family of a pipeline class name (``model_index.json``'s ``_class_name``). Refuses the
    family's other pipelines (inpainting, image to image, Fill, Kontext, ...) by name, and others."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    relatives = [f for f in FAMILIES.values() if class_name.startswith(f.relatives_prefix())]
    if relatives:
        family = max(relatives, key=lambda f: len(f.relatives_prefix()))
        task = next((what for word, what in OTHER_TASKS.items() if word in class_name), "another task")
        made = "video" if family.video else "image"
        raise DifftuneError(
            f"unsupported base model family: {class_name} (a {family.title} pipeline for {task}; difftune "
            f"trains the text-to-{made} {' / '.join(family.pipeline_classes)}). Supported: {_supported()}")
    raise DifftuneError(f"unsupported base model family: {class_name}. Supported: {_supported()} checkpoints")


def family_of(pipeline: Any) -> type[ModelFamily]:
    """The family of a loaded pipeline; a clear error for anything else."""
    return family_of_class(type(pipeline).__name__)


def pipeline_family(pipeline: Any) -> str:
    """The family name of a loaded pipeline (``"sd"``, ``"sdxl"``, ...)."""
    return family_of(pipeline).name


def training_family(pipeline: Any, device: torch.device, options: LossOptions) -> ModelFamily:
    """The family of a loaded pipeline, bound to it for training (refuses unsupported pipelines)."""
    return family_of(pipeline)(pipeline, device, options)


def tiny_builtins() -> dict[str, type[ModelFamily]]:
    """``{"tiny-sd": SDFamily, ...}``: the families that have a tiny built-in, by its name (and their
    `tiny_variants`, ``tiny-wan22``, ...)."""
    builtins = {}
    for family in FAMILIES.values():
        if family.tiny_name():
            builtins[family.tiny_name()] = family
            builtins.update({f"tiny-{variant}": family for variant in family.tiny_variants})
    return builtins


def denoiser_components() -> tuple[str, ...]:
    """Every registered family's denoiser component name (``unet``, ``transformer``), once each."""
    return tuple(dict.fromkeys(family.denoiser_component for family in FAMILIES.values()))


def expert_components() -> tuple[str, ...]:
    """Every registered family's further denoisers (experts after the first: ``transformer_2``), once each."""
    names = (name for family in FAMILIES.values() for name in family.expert_components[1:])
    return tuple(dict.fromkeys(names))


def text_encoder_components() -> tuple[str, ...]:
    names = (name for family in FAMILIES.values() for name in family.text_encoder_components)
    return tuple(dict.fromkeys(names))


def _titles(families: list[type[ModelFamily]]) -> str:
    return " and ".join(family.title for family in families)


def titles_with(capability: str) -> str:
    """The registered families whose ``capability`` attribute is true or not empty, by title (for help
    texts: ``SD 1.x/2.x, SDXL``)."""
    return ", ".join(family.title for family in FAMILIES.values() if getattr(family, capability))


def flag_families(flag: str) -> str:
    """The trainable families a trainer flag applies to (``SD3, Flux``), as its help text names them."""
    return ", ".join(f.title for f in FAMILIES.values() if f.trainable and flag in f.applicable_flags())


def flag_defaults(flag: str) -> str:
    """A trainer flag's default on each family that takes it (``logit_normal on SD3, none on Flux``)."""
    titles: dict[Any, list[str]] = {}
    for family in FAMILIES.values():
        if family.trainable and flag in family.applicable_flags() and flag in family.option_defaults:
            titles.setdefault(family.option_defaults[flag], []).append(family.title)
    if len(titles) == 1:
        return str(next(iter(titles)))
    return ", ".join(f"{value} on {' and '.join(names)}" for value, names in titles.items())


def check_flags(family: type[ModelFamily], values: Mapping[str, Any]) -> None:
    """Refuse trainer flags (``values``: flag name → value, None or False when not given) that do not
    apply to ``family``: those of another noise process (DDPM vs flow matching) or another family's own
    (Flux's guidance embedding and T5 length). The message names where they apply."""
    trainable = [f for f in FAMILIES.values() if f.trainable]
    processes = {f.process_title: f.process_flags for f in trainable}
    owners = [(title, flags, [f for f in trainable if f.process_title == title], f" ({title})")
              for title, flags in processes.items()]
    own_flags = dict.fromkeys(flag for f in trainable for flag in f.family_flags)
    owners += [(flag, (flag,), [f for f in trainable if flag in f.family_flags], "") for flag in own_flags]
    applicable = set(family.applicable_flags())
    for _, flags, where, note in owners:
        given = [f"--{name}" for name in flags
                 if name not in applicable and values.get(name) is not None and values.get(name) is not False]
        if given:
            raise DifftuneError(f"{', '.join(given)} only apply to {_titles(where)}{note}; "
                                f"the base model is {family.name}")


def check_capability(family: type[ModelFamily], capability: str, what: str) -> None:
    """Refuse ``what`` (a flag, a feature) on a family whose ``capability`` attribute is false or
    empty, naming the families that have it."""
    if not getattr(family, capability):
        able = [f for f in FAMILIES.values() if getattr(f, capability)]
        raise DifftuneError(f"{what} supports {_titles(able)}; the base model is {family.name}")


def check_text_encoder_training(family: type[ModelFamily], flag: str = "--train_text_encoder") -> None:
    """``flag`` (--train_text_encoder, --train_token_embedding) needs a family whose text encoders
    difftune can train."""
    check_capability(family, "trainable_text_encoders", flag)


def check_export_format(family: type[ModelFamily], fmt: str) -> None:
    """Refuse an export format the family cannot be written in, naming both."""
    if fmt == "single-file" and family.single_file_layout is None:
        layouts = "/".join(f.single_file_layout for f in FAMILIES.values() if f.single_file_layout)
        raise DifftuneError(f"--format single-file writes the original {layouts} layout; a {family.name} "
                            "model exports with --format diffusers")
    reason = family.export_refusal(fmt)
    if reason is not None:
        raise DifftuneError(f"--format {fmt} on a {family.title} model ({family.name}): {reason}")


def check_export_modules(family: type[ModelFamily], fmt: str, modules: Iterable[str],
                         denoiser_config: Any = None) -> None:
    """Refuse a LoRA or diff export of an adapter on ``modules`` (of the family's denoiser, whose config
    is ``denoiser_config``) that the format's tool has no name for (`LoraKeyLayout.known_modules`),
    before anything is trained or loaded."""
    layout = family.lora_layouts.get(family.diff_layout if fmt == "diff" else fmt)
    if fmt not in ("kohya", "comfyui", "diff") or layout is None or layout.known_modules is None:
        return
    for module in modules:
        try:
            layout.key(family.denoiser_component, module, denoiser_config)
        except DifftuneError as err:
            raise DifftuneError(f"--format {fmt} on a {family.title} model ({family.name}): {err}") from None


for _family in (SDFamily, SDXLFamily, SD3Family, FluxFamily, PixArtFamily, Flux2Family, Flux2KleinFamily,
                QwenImageFamily, ZImageFamily, WanFamily):
    register_family(_family)

__all__ = [
    "EXPORT_FORMATS", "FAMILIES", "DDPMFamily", "FlowMatchingFamily", "LoraKeyLayout", "LossOptions",
    "ModelDescription", "ModelFamily", "NoisyInput", "TrainingBatch", "check_capability",
    "check_export_format", "check_export_modules", "check_flags", "check_text_encoder_training",
    "denoiser_components", "expert_components", "family_of",
    "family_of_class", "flag_defaults", "flag_families", "get_family", "pipeline_family", "register_family",
    "text_encoder_components",
    "tiny_builtins", "titles_with", "training_family",
]
