"""What a quantized model deploys as, one layer at a time: :class:`DeployableLayer`.

A deployable layer is a Conv/Linear weight as integer codes times per-row scales, with the
codebook its codes come from (when not the symmetric range of its bits) and how its input is
quantized. :func:`deployable_layers` derives them from a model prepared by
:func:`sqdist.quantize_model` (every quantized layer, and with ``keep_fp_bits=8`` the
full-precision ones as 8-bit per-row codes); both writers, the packed file
(:func:`sqdist.export.export_model`) and ONNX (:func:`sqdist.export.export_onnx`), consume them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bits import _check_bits, checked_codes, code_levels
from .format import ExportError, check_keep_fp_bits


@dataclass(frozen=True)
class DeployableLayer:
    """One Conv/Linear layer as deployed: ``weight = scale[:, None] * codes``.

    Attributes:
        codes: int8 on the CPU, the weight's shape ``(m, ...)``; integers that fit ``bits``
            (``+-1`` at one bit), or members of ``levels``.
        scale: ``(m,)`` per-row scales on the CPU, in the weight's dtype.
        bits: bits per stored code (8 for a full-precision layer stored as codes).
        levels: the quantizer's codebook (sorted distinct ints, ``code_levels()``) when its codes
            are not the symmetric range of ``bits``; they are then stored as indices into it.
        input: ``(scale, zero_point, qmin, qmax)`` when the layer's input is quantized per tensor
            (:func:`activation_qdq`), else None.
        quantizer: the registered name of the layer's weight quantizer; None for a
            full-precision layer stored as 8-bit per-row codes (:func:`int8_rows`).
    """

    codes: Tensor
    scale: Tensor
    bits: int
    levels: list[int] | None = None
    input: tuple[float, int, int, int] | None = None
    quantizer: str | None = None


def deployable_layers(model: nn.Module, keep_fp_bits: int = 32) -> dict[str, DeployableLayer]:
    """Every quantized layer of ``model`` by name, in module order, then (``keep_fp_bits=8``) every
    full-precision Conv/Linear layer (:func:`full_precision_layers`) as 8-bit per-row codes.

    Codes come from each quantizer's ``quantize_codes`` and are checked against its bits and
    codebook; a problem is an :class:`~sqdist.export.format.ExportError` naming the layer.
    """
    keep_fp_bits = check_keep_fp_bits(keep_fp_bits)
    out: dict[str, DeployableLayer] = {}
    kept = full_precision_layers(model) if keep_fp_bits == 8 else {}
    with torch.no_grad():
        for name, layer in _sq_layers(model).items():
            quantizer = layer.quantizer
            qname = getattr(quantizer, "quantizer_name", "?")
            bits = _check_bits(getattr(quantizer, "bits", None), f"quantizer {qname!r} of layer {name}")
            act = layer_input_qdq(layer, name)
            w = layer.weight.detach()
            codes, scale = quantizer.quantize_codes(w.reshape(w.shape[0], -1))
            if tuple(scale.shape) != (w.shape[0],):
                raise ExportError(f"quantizer {qname!r} returned scale of shape {tuple(scale.shape)} for layer "
                                  f"{name}; expected ({w.shape[0]},)")
            where = f"layer {name}, quantizer {qname!r}"
            levels = code_levels(quantizer, bits, where)
            codes = checked_codes(codes, bits, where, levels).reshape(w.shape)
            out[name] = DeployableLayer(codes, scale.detach().to(w.dtype).cpu(), bits, levels, act, qname)
        for name, layer in kept.items():
            codes, scale = int8_rows(layer.weight)
            out[name] = DeployableLayer(codes.reshape(layer.weight.shape), scale.cpu(), 8)
    return out


def layer_input_qdq(layer: nn.Module, name: str) -> tuple[float, int, int, int] | None:
    """How SQ ``layer`` quantizes its input, as one per-tensor ``(scale, zero_point, qmin, qmax)``, or None.

    The forward applies the weight quantizer's own input quantization, then the activation
    quantizer (``quant.activations``): :meth:`sqdist.nn.SQLayer.quantize_input`. Two successive
    quantizations are one when their scales are equal (the second keeps the first's codes, clamped to
    its own range); other pairs are an :class:`ExportError`, as is an activation quantizer that never saw
    an input (its step is a placeholder).
    """
    source = getattr(layer, "input_quantizer", None)  # an activation quantizer (quant.activations)
    calibrated = getattr(source, "calibrated", None)
    if isinstance(calibrated, Tensor) and not bool(calibrated.all()):
        raise ExportError(f"layer {name}: activation quantizer {getattr(source, 'quantizer_name', '?')!r} was never "
                          f"calibrated (its scale is a placeholder); run sqdist.calibrate_activations(model, x) or "
                          f"train before export")
    own = activation_qdq(layer.quantizer, name)
    act = activation_qdq(source, name) if source is not None else None
    if own is None or act is None:
        return act if own is None else own
    (s1, z1, lo1, hi1), (s2, z2, lo2, hi2) = own, act
    lo, hi = max(lo1 - z1 + z2, lo2), min(hi1 - z1 + z2, hi2)  # the first's codes on the second's zero point
    if s1 != s2 or not lo <= z2 <= hi or lo == hi:
        raise ExportError(f"layer {name}: quantizer {getattr(layer.quantizer, 'quantizer_name', '?')!r} quantizes "
                          f"its input with scale {s1:g} and activation quantizer "
                          f"{getattr(source, 'quantizer_name', '?')!r} then with scale {s2:g}; the export holds one "
                          f"input quantization per layer; allowed: equal scales, or only one of the two")
    return s2, z2, lo, hi


def _sq_layers(model: nn.Module) -> dict[str, nn.Module]:
    from ..nn import SQLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, SQLayer)}


def full_precision_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Conv/Linear layers that are not quantized (stem, classifier, excluded layers), by name."""
    from ..nn import SQ_CLASSES, SQLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, tuple(SQ_CLASSES)) and not isinstance(m, SQLayer)
            and isinstance(getattr(m, "weight", None), Tensor) and m.weight.is_floating_point()}


def int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit per-row symmetric codes of a full-precision weight ``w`` (m, ...).

    Returns (``codes`` int8 (m, n), ``scale`` (m,) in ``w``'s dtype): ``scale_i = max |W_i| / 127``,
    ``codes = round(W / scale)``; the stored weight is ``scale[:, None] * codes``.
    """
    from ..quant.weights import kbit_reference

    codes, scale = kbit_reference(w.detach().reshape(w.shape[0], -1).float(), bits=8)
    return codes.to(torch.int8), scale.to(w.dtype)


def check_ratio(model: nn.Module, sq_ratio: float | None, force: bool) -> float:
    """The SQ ratio to record (default: the layers' controller); refuses one below 1 unless ``force``."""
    layers = _sq_layers(model)
    if not layers:
        raise ExportError("model has no quantized layers: nothing to pack (call sqdist.quantize_model first)")
    first = next(iter(layers.values()))
    if sq_ratio is None:
        sq_ratio = first._sq.selector.ratio if getattr(first, "_sq", None) is not None else 1.0
    if sq_ratio < 1.0 and not force:
        raise ExportError(f"SQ ratio is {sq_ratio:g} < 1.0: training had not reached the fully quantized "
                          f"stage, so the packed model differs from the trained one; finish training or pass --force")
    return float(sq_ratio)


def activation_qdq(quantizer: nn.Module, where: str) -> tuple[float, int, int, int] | None:
    """How ``quantizer`` quantizes its layer's input: ``(scale, zero_point, qmin, qmax)``, or None.

    The hook: a quantizer that quantizes activations defines ``activation_qparams()``
    returning None or ``(scale, zero_point, qmin, qmax)``, per tensor, the input being
    ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`` with
    ``qmin..qmax`` inside int8 (``qmin < 0``) or uint8; e.g. 4-bit signed is ``(s, 0, -8, 7)``.
    A quantizer that overrides ``quantize_input`` without declaring it cannot be written
    faithfully and is refused.
    """
    from ..quant.weights import Quantizer

    declare = getattr(quantizer, "activation_qparams", None)
    qparams = declare() if callable(declare) else None
    if qparams is None:
        if type(quantizer).quantize_input is not Quantizer.quantize_input:
            raise ExportError(f"layer {where}: quantizer {getattr(quantizer, 'quantizer_name', '?')!r} quantizes "
                              f"its input but has no activation_qparams(); ONNX export needs (scale, zero_point, "
                              f"qmin, qmax) to write it as QuantizeLinear/DequantizeLinear")
        return None
    try:
        scale, zero_point, qmin, qmax = qparams
        scale = float(scale.item() if isinstance(scale, Tensor) else scale)
        zero_point, qmin, qmax = (int(v.item() if isinstance(v, Tensor) else v) for v in (zero_point, qmin, qmax))
    except (TypeError, ValueError, RuntimeError):
        raise ExportError(f"layer {where}: activation_qparams() returned {qparams!r}; allowed: None or "
                          f"(scale, zero_point, qmin, qmax), per tensor") from None
    if not (-128 <= qmin < qmax <= 127 or 0 <= qmin < qmax <= 255) or not qmin <= zero_point <= qmax \
            or not scale > 0:
        raise ExportError(f"layer {where}: activation_qparams() returned scale={scale}, zero_point={zero_point}, "
                          f"qmin={qmin}, qmax={qmax}; allowed: scale > 0, qmin <= zero_point <= qmax, "
                          f"qmin..qmax inside int8 [-128, 127] or uint8 [0, 255]")
    return scale, zero_point, qmin, qmax


def model_copy(model: nn.Module) -> nn.Module:
    """A deep copy of SQ ``model`` without its SQ controller (generators, selector state: not part
    of the network, and not always copyable); ``model`` is left as it is."""
    layers = _sq_layers(model)
    controllers = {name: layer.__dict__.get("_sq") for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer._sq = None
        return copy.deepcopy(model)
    finally:
        for name, layer in layers.items():
            layer._sq = controllers[name]


def aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{first name: [other names]}`` of the modules that ``model`` reaches under more than one name."""
    by_object: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        by_object.setdefault(id(module), []).append(name)
    return {names[0]: names[1:] for names in by_object.values() if len(names) > 1}


def unfuse_attention(model: nn.Module) -> list[nn.Module]:
    """Turn timm's fused attention off in ``model`` (the explicit ``softmax(q k^T) v``: the TorchScript
    exporter cannot trace ``F.scaled_dot_product_attention`` as EVA calls it, and the export check must
    sum in the traced order); returns the modules it changed, to turn back on."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    for m in fused:
        m.fused_attn = False
    return fused
