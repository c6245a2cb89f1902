"""Quantizer registry: ``@register_quantizer``, ``create_quantizer``, ``list_quantizers``.

Built-in quantizers register themselves on import; third-party packages register
through the entry-point group ``sqdist.quantizers`` (``name = "pkg.module:Class"``),
loaded lazily the first time a name is looked up or the list is asked for.
"""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Callable

ENTRY_POINT_GROUP = "sqdist.quantizers"

_QUANTIZERS: dict[str, type] = {}
_entry_points_loaded = False


def register_quantizer(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`~sqdist.quantizers.Quantizer` reachable by ``name``."""

    def decorate(cls: type) -> type:
        existing = _QUANTIZERS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"quantizer name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.quantizer_name = name
        _QUANTIZERS[name] = cls
        return cls

    return decorate


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import warnings

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _QUANTIZERS:
            taken = _QUANTIZERS[ep.name]
            if f"{taken.__module__}:{taken.__qualname__}" != ep.value:  # not the same class announced twice
                warnings.warn(f"sqdist: quantizer plugin {ep.name!r} ({ep.value}) skipped: the name is already "
                              f"registered by {taken.__module__}.{taken.__qualname__}; rename the entry point")
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break sqdist
            warnings.warn(f"sqdist: quantizer plugin {ep.name!r} ({ep.value}) failed to load: {exc}")
            continue
        if ep.name not in _QUANTIZERS:  # the plugin module may have used the decorator itself
            register_quantizer(ep.name)(cls)


def list_quantizers() -> list[str]:
    """Names of every registered quantizer, built-in and plugin, sorted."""
    _load_entry_points()
    return sorted(_QUANTIZERS)


def get_quantizer_class(name: str) -> type:
    _load_entry_points()
    try:
        return _QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; allowed: {', '.join(list_quantizers())}") from None


def quantizer_params(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``create_quantizer(name, ...)`` accepts, with defaults."""
    sig = inspect.signature(get_quantizer_class(name).__init__)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p for k, p in sig.parameters.items() if k != "self" and p.kind in named}


def create_quantizer(name: str, **params):
    """Build the quantizer registered as ``name`` with keyword ``params``.

    Unknown names and parameters raise ``ValueError`` naming what is allowed.
    """
    cls = get_quantizer_class(name)
    allowed = quantizer_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) or "none"
        raise ValueError(f"quantizer {name!r} has no parameter {unknown[0]!r}; allowed: {listed}")
    return cls(**params)
