"""Quantizer registries: weight quantizers and activation quantizers, by name.

Weights: ``@register_quantizer``, ``create_quantizer``, ``list_quantizers``; plugins
through the entry-point group ``sqdist.quantizers``. Activations (the input of a
quantized layer): ``@register_activation_quantizer``, ``create_activation_quantizer``,
``list_activation_quantizers``; plugins through ``sqdist.activation_quantizers``.
Built-ins register themselves on import (``sqdist.quant`` imports them); a plugin's entry point (``name =
"pkg.module:Class"``) is loaded lazily the first time a name is looked up or the list
is asked for.
"""
from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from typing import Callable

from .hooks import keep_mixin_hooks

ENTRY_POINT_GROUP = "sqdist.quantizers"
ACTIVATION_ENTRY_POINT_GROUP = "sqdist.activation_quantizers"

_QUANTIZERS: dict[str, type] = {}
_ACTIVATION_QUANTIZERS: dict[str, type] = {}
_entry_points_loaded = False
_activation_entry_points_loaded = False


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        existing = table.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"{kind} name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        keep_mixin_hooks(cls, f"{kind} {name!r}")
        cls.quantizer_name = name
        table[name] = cls
        return cls

    return decorate


def register_quantizer(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`~sqdist.quant.weights.Quantizer` reachable by ``name``."""
    return _register(_QUANTIZERS, "quantizer", name)


def register_activation_quantizer(name: str) -> Callable[[type], type]:
    """Class decorator: make an :class:`~sqdist.quant.activations.ActivationQuantizer` reachable by ``name``."""
    return _register(_ACTIVATION_QUANTIZERS, "activation quantizer", name)


def _load_group(group: str, table: dict[str, type], kind: str) -> None:
    import warnings

    for ep in entry_points(group=group):
        if ep.name in table:
            taken = table[ep.name]
            if f"{taken.__module__}:{taken.__qualname__}" != ep.value:  # not the same class announced twice
                warnings.warn(f"sqdist: {kind} plugin {ep.name!r} ({ep.value}) skipped: the name is already "
                              f"registered by {taken.__module__}.{taken.__qualname__}; rename the entry point")
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break sqdist
            warnings.warn(f"sqdist: {kind} plugin {ep.name!r} ({ep.value}) failed to load: {exc}")
            continue
        if ep.name not in table:  # the plugin module may have used the decorator itself
            _register(table, kind, ep.name)(cls)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        _load_group(ENTRY_POINT_GROUP, _QUANTIZERS, "quantizer")


def _load_activation_entry_points() -> None:
    global _activation_entry_points_loaded
    if not _activation_entry_points_loaded:
        _activation_entry_points_loaded = True
        _load_group(ACTIVATION_ENTRY_POINT_GROUP, _ACTIVATION_QUANTIZERS, "activation quantizer")


def _get(table: dict[str, type], kind: str, name: str) -> type:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(sorted(table))}") from None


def _params(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p for k, p in sig.parameters.items() if k != "self" and p.kind in named}


def _create(cls: type, kind: str, name: str, params: dict):
    allowed = _params(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listed = ", ".join(allowed) or "none"
        raise ValueError(f"{kind} {name!r} has no parameter {unknown[0]!r}; allowed: {listed}")
    return cls(**params)


# ---------------------------------------------------------------- weights
def list_quantizers() -> list[str]:
    """Names of every registered quantizer, built-in and plugin, sorted."""
    _load_entry_points()
    return sorted(_QUANTIZERS)


def get_quantizer_class(name: str) -> type:
    _load_entry_points()
    return _get(_QUANTIZERS, "quantizer", name)


def quantizer_params(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``create_quantizer(name, ...)`` accepts, with defaults."""
    return _params(get_quantizer_class(name))


def create_quantizer(name: str, **params):
    """Build the quantizer registered as ``name`` with keyword ``params``.

    Unknown names and parameters raise ``ValueError`` naming what is allowed.
    """
    return _create(get_quantizer_class(name), "quantizer", name, params)


# ---------------------------------------------------------------- activations
def list_activation_quantizers() -> list[str]:
    """Names of every registered activation quantizer, built-in and plugin, sorted."""
    _load_activation_entry_points()
    return sorted(_ACTIVATION_QUANTIZERS)


def get_activation_quantizer_class(name: str) -> type:
    _load_activation_entry_points()
    return _get(_ACTIVATION_QUANTIZERS, "activation quantizer", name)


def activation_quantizer_params(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters ``create_activation_quantizer(name, ...)`` accepts, with defaults."""
    return _params(get_activation_quantizer_class(name))


def create_activation_quantizer(name: str, **params):
    """Build the activation quantizer registered as ``name`` with keyword ``params``.

    Unknown names and parameters raise ``ValueError`` naming what is allowed.
    """
    return _create(get_activation_quantizer_class(name), "activation quantizer", name, params)
