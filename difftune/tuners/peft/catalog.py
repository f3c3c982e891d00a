"""Which peft tuners the ``peft`` method can drive, and how difftune's options become their config.

The list is read from the installed peft (its registry of config and tuner classes), not written
down here: any tuner whose config names ``target_modules`` and that `peft.inject_adapter_in_model`
accepts (no prompt learning, no state shared between layers) is offered. Whether it can take the
targeted *layers* is checked per layer kind by `difftune.tuners.peft.probe`.

Two of difftune's options have one meaning across tuners: ``rank`` is the peft config's ``r`` and
``alpha`` its ``alpha`` or ``lora_alpha``. Everything else is passed through as the tuner's own
fields (``options``), except the fields difftune itself sets (`MANAGED_FIELDS`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ...errors import DifftuneError

ADAPTER_NAME = "default"  # the peft adapter name the layers hold difftune's adapter under
# Names that are not a peft type of their own: DoRA is peft's LoRA with use_dora=True.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"dora": ("lora", {"use_dora": True})}
RANK_FIELD = "r"
ALPHA_FIELDS = ("alpha", "lora_alpha")
# peft config fields difftune sets itself or cannot honour, with the reason given to the user.
MANAGED_FIELDS: dict[str, str] = {
    "target_modules": "the layers come from --targets (preset, regex or list)",
    "exclude_modules": "narrow --targets instead",
    "layers_to_transform": "narrow --targets instead",
    "layers_pattern": "narrow --targets instead",
    "target_parameters": "difftune adapts whole layers (--targets)",
    "modules_to_save": "it would train whole modules outside the adapter, which the adapter file does not "
                       "hold",
    "peft_type": "it is the 'type' option",
    "task_type": "diffusion denoisers have no peft task type",
    "inference_mode": "difftune freezes and unfreezes the adapter itself",
    "base_model_name_or_path": "the adapter file records the base model",
    "revision": "the adapter file records the base model",
    "auto_mapping": "set by peft",
}
# Option values that would change tensors outside the adapted layers' own weights.
REFUSED_VALUES: dict[str, tuple[Any, str]] = {
    "bias": ("none", "any other value trains the base model's biases, which remove_adapter could not "
                     "restore"),
}
# Options that let a tuner change a layer's bias when it merges (else only weights change).
BIAS_CHANGING_FIELDS = ("lora_bias",)


@functools.cache
def available_types() -> dict[str, type]:
    """``{type name: peft config class}`` for every tuner of the installed peft the method can drive."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    types = {}
    for peft_type, config_class in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
        fields = {f.name for f in dataclasses.fields(config_class)}
        if tuner is None or "target_modules" not in fields or getattr(tuner, "uses_shared_state", False):
            continue
        if _overrides(config_class, "is_prompt_learning") or _overrides(config_class, "is_adaption_prompt"):
            continue  # not layer adapters: inject_adapter_in_model refuses them
        if "Shadow" in config_class.__name__:  # refused by inject_adapter_in_model by its class name
            continue
        types[str(peft_type.value).lower()] = config_class
    for alias, (name, _) in ALIASES.items():
        if name in types:
            types[alias] = types[name]
    return dict(sorted(types.items()))


def _overrides(config_class: type, name: str) -> bool:
    """Whether a peft config class redefines one of the ``is_*`` kind properties of its base (True there)."""
    from peft.config import PeftConfigMixin

    return getattr(config_class, name, None) is not getattr(PeftConfigMixin, name, None)


def config_class(type_name: str) -> type:
    types = available_types()
    if type_name not in types:
        raise DifftuneError(f"peft option 'type': unknown peft method {type_name!r}; the installed peft "
                            f"offers: {', '.join(types)}")
    return types[type_name]


def config_fields(type_name: str) -> list[str]:
    """The fields of the type's peft config a user may set through ``options``."""
    return sorted(f.name for f in dataclasses.fields(config_class(type_name))
                  if f.init and f.name not in MANAGED_FIELDS)


def peft_kwargs(type_name: str, rank: int | None, alpha: float | None,
                options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the type's peft config (less ``target_modules``), checked by name."""
    fields = set(config_fields(type_name))
    for key, value in options.items():
        if key in MANAGED_FIELDS:
            raise DifftuneError(f"peft option '{key}' cannot be set: {MANAGED_FIELDS[key]}")
        if key not in fields:
            owner = config_class(type_name).__name__
            raise DifftuneError(f"peft option '{key}' is not a field of peft's {owner} ({type_name}); "
                                f"its fields: {', '.join(sorted(fields))}")
        allowed = REFUSED_VALUES.get(key)
        if allowed is not None and value != allowed[0]:
            raise DifftuneError(f"peft option '{key}' must be {allowed[0]!r}: {allowed[1]}")
    kwargs = dict(ALIASES.get(type_name, ("", {}))[1])
    for key, value in kwargs.items():
        if key in options and options[key] != value:
            raise DifftuneError(f"peft option '{key}' is {value!r} for type {type_name!r}; use another type")
    kwargs.update(options)
    if rank is not None:
        if RANK_FIELD not in fields:
            raise DifftuneError(f"peft type {type_name!r} has no rank (no field '{RANK_FIELD}'); set its own "
                                f"fields in 'options' ({', '.join(sorted(fields))})")
        if RANK_FIELD in options:
            raise DifftuneError("give the peft rank once: 'rank' or options['r'], not both")
        kwargs[RANK_FIELD] = rank
        if type_name == "oft" and "oft_block_size" not in options:
            kwargs["oft_block_size"] = 0  # peft's OFT takes either r (blocks) or a block size, never both
    if alpha is not None:
        field = next((name for name in ALPHA_FIELDS if name in fields), None)
        if field is None:
            raise DifftuneError(f"peft type {type_name!r} has no alpha (none of {', '.join(ALPHA_FIELDS)})")
        if field in options:
            raise DifftuneError(f"give the peft alpha once: 'alpha' or options['{field}'], not both")
        kwargs[field] = alpha
    return kwargs


def build_peft_config(type_name: str, kwargs: dict[str, Any], target_modules: Any = None) -> Any:
    """The peft config object; its own checks (``__post_init__``) become a DifftuneError."""
    import warnings

    cls = config_class(type_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about values it adjusts; the attach shows them
            return cls(**kwargs, target_modules=target_modules)
    except (TypeError, ValueError) as err:
        raise DifftuneError(f"peft's {cls.__name__} ({type_name}) refuses the options "
                            f"{kwargs}: {str(err).splitlines()[0]}") from None


def changes_bias(peft_config: Any) -> bool:
    return any(bool(getattr(peft_config, name, False)) for name in BIAS_CHANGING_FIELDS)


def forget_peft_config(model: Any, adapter_name: str = ADAPTER_NAME) -> None:
    """Drop the config peft leaves on the model; without this a later peft adapter (difftune's or
    diffusers' load_lora_weights) finds a stale entry of that name."""
    configs = model.__dict__.get("peft_config")
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
        if not configs:
            del model.__dict__["peft_config"]
