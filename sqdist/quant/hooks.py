"""The quantizer hooks: how a method with a schedule, a loss term, per-layer statistics or a
model-wide view lives in a plugin without a trainer of its own.

:class:`QuantizerHooks` is a base of :class:`~sqdist.quant.weights.Quantizer` and
:class:`~sqdist.quant.activations.ActivationQuantizer`; every hook is a no-op by default and a
quantizer overrides the ones it needs. The trainer (:mod:`sqdist.train`) calls them on every weight
and activation quantizer module of the model; :func:`sqdist.quantize_model` calls
:meth:`~QuantizerHooks.on_model_quantized`.

A mixin that defines hooks and is listed *after* ``Quantizer`` in a class's bases should itself
subclass :class:`QuantizerHooks`, or the no-ops come first in the method order. For one release,
registering such a class still works as before (:func:`keep_mixin_hooks` puts the mixin's hooks on
the class) with a DeprecationWarning.
"""
from __future__ import annotations

import warnings

HOOKS = ("set_progress", "regularization", "recalibrate_bn_after_epoch", "metrics", "set_run_seed",
         "on_model_quantized")


class QuantizerHooks:
    """The hooks the trainer calls on a quantizer; each a no-op until a quantizer overrides it."""

    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        """Before every optimizer step (and before each evaluation, with the steps trained): a schedule as a
        pure function of the step (a temperature, a noise width), so that a resumed run continues it exactly."""

    def regularization(self):
        """A scalar tensor added to the loss of every micro-batch, or None (the default: no term)."""
        return None

    def recalibrate_bn_after_epoch(self, epoch: int) -> bool:
        """After epoch ``epoch`` (0-based) ends: True when the BatchNorm statistics should be re-estimated for
        the network as evaluated (on ``train.bn_recalibrate`` batches, ``HOOK_BN_BATCHES`` when that is 0);
        when any quantizer says so, they are."""
        return False

    def metrics(self) -> dict[str, float]:
        """Numbers logged as ``quant/<module>/<key>`` with each log line (default: none)."""
        return {}

    def set_run_seed(self, seed: int) -> None:
        """Once, after the model is built (and resumed): ``train.seed``, the same on every rank (the global RNG is
        seeded ``seed + rank``), for a quantizer's own draws."""

    def on_model_quantized(self, name: str, layers: dict) -> None:
        """Once, after :func:`sqdist.quantize_model` quantized and calibrated every layer: this quantizer's layer
        name and the model's SQ layers ``{name: layer}`` in module order, for a method that spans layers (a
        regularizer on the average width) or needs a per-layer value equal in every process. Keep references
        to other quantizers in a plain tuple, not as submodules (they would appear twice in ``state_dict``)."""


def shadowed_hooks(cls: type) -> list[str]:
    """The hooks some class in ``cls``'s bases defines that ``cls`` nevertheless resolves to the no-op of
    :class:`QuantizerHooks` (a hook mixin listed after ``Quantizer`` that does not subclass it)."""
    out = []
    for hook in HOOKS:
        if getattr(cls, hook, None) is not getattr(QuantizerHooks, hook):
            continue
        if any(hook in vars(base) for base in cls.__mro__ if base is not QuantizerHooks):
            out.append(hook)
    return out


def keep_mixin_hooks(cls: type, what: str) -> None:
    """Put on ``cls`` the hooks :func:`shadowed_hooks` finds (each from the first base that defines it, as
    before the hooks had a base class), with a DeprecationWarning: such a mixin should subclass QuantizerHooks."""
    shadowed = shadowed_hooks(cls)
    if not shadowed:
        return
    for hook in shadowed:
        setattr(cls, hook, next(vars(base)[hook] for base in cls.__mro__
                                if base is not QuantizerHooks and hook in vars(base)))
    warnings.warn(f"{what}: {cls.__qualname__} defines {', '.join(shadowed)} in a base listed after the quantizer "
                  f"base that does not subclass sqdist.plugin.QuantizerHooks; they run as before, but make that base "
                  f"subclass QuantizerHooks (or list it first): this goes in the next release", DeprecationWarning,
                  stacklevel=3)
