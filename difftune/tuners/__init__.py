"""The registry of adapter methods: one place that maps a method name to its class.

Each method lives in its own sub-package (config, layer/model, and its math), as in
peft's tuners; registering it here is all the public API needs.
"""

from __future__ import annotations

from ..errors import DifftuneError
from .base import Adapter, AdapterConfig, AdapterLayer, LayerAdapter
from .lora import LoraAdapter
from .sara import SaraAdapter
from .svfit import SVFitAdapter
from .tlora import TLoraAdapter

METHODS: dict[str, type[Adapter]] = {}


def register_method(adapter_class: type[Adapter]) -> type[Adapter]:
    """Make a method available to `difftune.add_adapter` and the trainer by its name."""
    METHODS[adapter_class.method] = adapter_class
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

__all__ = ["METHODS", "Adapter", "AdapterConfig", "AdapterLayer", "LayerAdapter",
           "get_method", "register_method"]
