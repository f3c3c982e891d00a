"""The registry of adapter methods: one place that maps a method name to its class.

Each method lives in its own sub-package (config, layer/model, and its math), as in
peft's tuners; registering it here is all the public API needs.
"""

from __future__ import annotations

import dataclasses

from ..errors import DifftuneError
from ..registration import check_plugin_class
from .base import Adapter, AdapterConfig, AdapterLayer, LayerAdapter
from .lora import LoraAdapter
from .peft import PeftAdapter
from .sara import SaraAdapter
from .svfit import SVFitAdapter
from .tlora import TLoraAdapter

METHODS: dict[str, type[Adapter]] = {}


def register_method(adapter_class: type[Adapter]) -> type[Adapter]:
    """Make a method available to `difftune.add_adapter` and the trainer by its name; refuses a class
    that is not a complete `Adapter` with a name and a config dataclass, or a name taken already."""
    where = check_plugin_class(adapter_class, Adapter, "register_method")
    name = getattr(adapter_class, "method", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise DifftuneError(f"{where}: class attribute 'method' must be a name, got {name!r}")
    config_class = adapter_class.config_class
    if not (dataclasses.is_dataclass(config_class) and issubclass(config_class, AdapterConfig)):
        raise DifftuneError(f"{where}: 'config_class' must be an AdapterConfig dataclass")
    if name in METHODS:
        raise DifftuneError(f"{where}: a method named '{name}' is registered already "
                            f"({METHODS[name].__name__})")
    METHODS[name] = adapter_class
    return adapter_class


def get_method(name: str) -> type[Adapter]:
    try:
        return METHODS[name]
    except KeyError:
        raise DifftuneError(
            f"unknown adapter method '{name}'. Available: {', '.join(sorted(METHODS))}"
        ) from None


register_method(LoraAdapter)
register_method(SaraAdapter)
register_method(SVFitAdapter)
register_method(TLoraAdapter)
register_method(PeftAdapter)

__all__ = ["METHODS", "Adapter", "AdapterConfig", "AdapterLayer", "LayerAdapter",
           "get_method", "register_method"]
