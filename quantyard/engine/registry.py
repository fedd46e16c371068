"""Registry of converters keyed by format string ("gguf", "onnx", ...).

Entries are factories so that registering costs nothing: the heavy converter module is only
imported when a conversion of that format is actually requested.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from .errors import UnsupportedTarget


class Converter(Protocol):
    """What a format converter offers the engine facade."""

    def estimate(self, source: Any, target: Any) -> dict[str, int]: ...

    def convert(self, source: Any, target: Any, out_dir: Any, *, progress: Any, provenance: Any) -> Any: ...


_FACTORIES: dict[str, Callable[[], Converter]] = {}
_INSTANCES: dict[str, Converter] = {}


def register_converter(fmt: str, factory: Callable[[], Converter]) -> None:
    """Register a converter factory; a key registered twice is a programming error."""
    if fmt in _FACTORIES:
        raise ValueError(f"a converter for format {fmt!r} is already registered")
    _FACTORIES[fmt] = factory


def lazy_factory(module: str, attr: str) -> Callable[[], Converter]:
    """A factory that imports `module` and instantiates `attr` on first use."""

    def make() -> Converter:
        return getattr(importlib.import_module(module), attr)()

    return make


def get_converter(fmt: str) -> Converter:
    if fmt not in _FACTORIES:
        raise UnsupportedTarget(f"no converter for format {fmt!r}; registered: {', '.join(sorted(_FACTORIES))}")
    if fmt not in _INSTANCES:
        _INSTANCES[fmt] = _FACTORIES[fmt]()
    return _INSTANCES[fmt]


def registered_formats() -> list[str]:
    return sorted(_FACTORIES)


__all__ = ["Converter", "register_converter", "lazy_factory", "get_converter", "registered_formats"]
