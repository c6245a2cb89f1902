"""What a quantizer plugin needs from sqdist, in one public place.

A plugin is a package that registers quantizers (``@register_quantizer("name")`` on a
:class:`Quantizer` subclass, or an entry point in the group ``sqdist.quantizers`` /
``sqdist.activation_quantizers``) and imports from here only::

    from sqdist.plugin import (Quantizer, ActivationQuantizer, QuantizerHooks, QuantizerError,
                               grad_scale, positive_step, initial_step, load_source, plugin_kernel,
                               kernel_mode, kernel_backend)

- :class:`QuantizerHooks`: the trainer's hooks (``set_progress``, ``regularization``, ``metrics``,
  ``recalibrate_bn_after_epoch``, ``set_run_seed``, ``on_model_quantized``), no-ops by default; both
  quantizer bases have them, a quantizer overrides what it needs.
- :class:`QuantizerError`: the one error type of a plugin, a setting the user can fix; the train,
  export, compress and ptq commands all report it as one line and exit 2.
- :func:`grad_scale`, :func:`positive_step`, :func:`initial_step`: LSQ's gradient scale and the learned
  step's positive parametrization and initial value.
- :func:`load_source`: build a one-file C++ extension on first use (None where it cannot be built);
  :func:`plugin_kernel`: the pair ``kernel()`` (that module or None) and ``kernel_available()`` (a constant to
  ``torch.compile``) for one source file.
- :func:`kernel_mode`: the one kernel switch, ``SQDIST_KERNELS`` (``reference|cpu|cuda|triton|auto``),
  for core and plugins; :func:`kernel_backend`: the fast backend (``cpu``, ``triton``) that serves a tensor
  under it, or None (the reference).

The layout of a plugin (``plugins/sqdist-<name>/``): ``README.md``, ``pyproject.toml`` (its entry
points), the package ``sqdist_<name>/`` (with its kernel sources, ``*_cpu.cpp``), ``tests/`` and
``bench.py``.
"""
from __future__ import annotations

import os
import warnings

from .config import RecipeError
from .files import ExportError
from .quant.activations import ActivationQuantizer
from .quant.hooks import HOOKS, QuantizerHooks, shadowed_hooks
from .quant.kernels import (MODES as KERNEL_MODES, backend_for as kernel_backend, load_source, mode as _core_mode,
                            plugin_kernel)
from .quant.lsq import grad_scale
from .quant.registry import register_activation_quantizer, register_quantizer
from .quant.steps import initial_step, positive_step
from .quant.weights import Quantizer

__all__ = [
    "ActivationQuantizer", "HOOKS", "KERNEL_MODES", "Quantizer", "QuantizerError", "QuantizerHooks", "grad_scale",
    "initial_step", "kernel_backend", "kernel_mode", "load_source", "plugin_kernel", "positive_step",
    "register_activation_quantizer", "register_quantizer", "shadowed_hooks",
]


class QuantizerError(RecipeError, ExportError):
    """A quantizer setting the user can fix (a recipe value, a layer it cannot export), one line naming the
    key, the value and what is allowed. Both a :class:`~sqdist.config.RecipeError` and an
    :class:`~sqdist.export.ExportError`, so every command reports it the same way."""


_warned: set[str] = set()


def kernel_mode(old_variable: str | None = None) -> str:
    """The kernel choice, ``SQDIST_KERNELS`` (one of :data:`KERNEL_MODES`, default ``auto``), read at every call.

    ``old_variable``: a plugin's own switch of earlier releases (``SQDIST_SLB_KERNEL``,
    ``SQDIST_SRQ_KERNEL``); when it is set its value is returned as it is (the plugin checks it),
    with a DeprecationWarning once per process: it goes in the next release."""
    if old_variable is not None and old_variable in os.environ:
        if old_variable not in _warned:
            _warned.add(old_variable)
            warnings.warn(f"{old_variable} is deprecated and goes in the next release; set SQDIST_KERNELS "
                          f"({'|'.join(KERNEL_MODES)}), the one switch for core and plugins", DeprecationWarning,
                          stacklevel=2)
        return os.environ[old_variable].strip().lower()
    return _core_mode()
