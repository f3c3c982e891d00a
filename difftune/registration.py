"""What the registries of plug-ins (adapter methods, model families) check of every class they are
given, before they take it: refused with a one-line error that names the registration."""

from __future__ import annotations

import inspect
from typing import Any

from .errors import DifftuneError


def check_plugin_class(plugin: Any, base: type, registration: str) -> str:
    """Refuse ``plugin`` unless it is a complete (nothing abstract left) subclass of ``base``; returns
    the registration's name for further messages (``register_method('LoraAdapter')``)."""
    where = f"{registration}({getattr(plugin, '__name__', plugin)!r})"
    if not (inspect.isclass(plugin) and issubclass(plugin, base)):
        raise DifftuneError(f"{where}: not a subclass of {base.__module__}.{base.__name__}")
    if inspect.isabstract(plugin):
        missing = ", ".join(sorted(plugin.__abstractmethods__))
        raise DifftuneError(f"{where}: the class does not implement {missing}")
    return where
