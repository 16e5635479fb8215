"""Method registry: `@register` a `Method` subclass; `get_method(name)` finds it."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import Batch, LoRAOptions, Method, MethodConfig

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two methods are named '{cls.name}': {REGISTRY[cls.name].__module__}."
                         f"{REGISTRY[cls.name].__name__} and {cls.__module__}.{cls.__name__}")
    REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    """Import every module of this package: each method file registers itself."""
    for m in pkgutil.iter_modules(__path__):
        if m.name != "base":
            importlib.import_module(f"{__name__}.{m.name}")


def get_method(name: str, source: str = "") -> type[Method]:
    _load_all()
    if name not in REGISTRY:
        where = f" in {source}" if source else ""
        raise ConfigError(f"unknown method '{name}'{where} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def list_methods() -> dict[str, str]:
    _load_all()
    return {n: (c.__doc__ or "").strip().split("\n")[0] for n, c in sorted(REGISTRY.items())}


__all__ = ["Batch", "LoRAOptions", "Method", "MethodConfig", "register", "get_method", "list_methods"]
