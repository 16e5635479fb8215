"""Method registry: `@register` a `Method` subclass (and its named configurations); `lookup(name)` finds it."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Capabilities, LoRAOptions, Method, Variant


@dataclass(frozen=True)
class Entry:
    """A name `--method` accepts: a method class, with a named configuration's settings and run defaults."""

    name: str
    cls: type[Method]
    settings: dict
    run: dict
    doc: str


REGISTRY: dict[str, Entry] = {}


def _add(entry: Entry) -> None:
    old = REGISTRY.get(entry.name)
    if old is not None and old.cls is not entry.cls:
        raise ValueError(f"two methods are named '{entry.name}': {old.cls.__module__}.{old.cls.__name__} and "
                         f"{entry.cls.__module__}.{entry.cls.__name__}")
    REGISTRY[entry.name] = entry


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _add(Entry(cls.name, cls, {}, {}, (cls.__doc__ or "").strip().split("\n")[0]))
    for name, v in cls.variants.items():
        _add(Entry(name, cls, dict(v.settings), dict(v.run), v.doc))
    return cls


def _load_all() -> None:
    """Import every module of this package: each method file registers itself."""
    for m in pkgutil.iter_modules(__path__):
        if m.name != "base":
            importlib.import_module(f"{__name__}.{m.name}")


def lookup(name: str, source: str = "") -> Entry:
    _load_all()
    if name not in REGISTRY:
        where = f" in {source}" if source else ""
        raise ConfigError(f"unknown method '{name}'{where} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def list_methods() -> dict[str, str]:
    _load_all()
    return {n: e.doc for n, e in sorted(REGISTRY.items())}


__all__ = ["Capabilities", "Entry", "LoRAOptions", "Method", "Variant", "register", "lookup", "list_methods"]
