"""The export check against the model that was trained, when the export rounds more than it did
(8-bit activations, an 8-bit stem and classifier): :func:`check_rounding` holds the converted
network to the model one rounding at a time (:func:`rounding_parity`); and what a user's CPU
changes in onnxruntime's integer kernels (:func:`wide_weight_codes`, :func:`cpu_has_vnni`).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .deployable import deployable_layers
from .format import ExportError

# the deployable network against the trained model, one rounding at a time (rounding_parity). int8 arithmetic
# (the int32 bias, float32 requantization) moves a code by one step at most, at a few percent of the codes and
# with no direction: at each point at most POINT_TOLERANCE of the codes more than one step off, at most
# STEP_TOLERANCE one step or more off, no channel off by CHANNEL_TOLERANCE steps on average (a bias or a
# scale off in one channel), and the logits with every point given at most LOGITS_TOLERANCE off (relative)
POINT_TOLERANCE = 0.01
STEP_TOLERANCE = 0.1
CHANNEL_TOLERANCE = 0.5
LOGITS_TOLERANCE = 0.01


def full_precision_weights(model: nn.Module, keep_fp_bits: int) -> dict[str, Tensor]:
    """The weights the export gives the model's full-precision layers (8-bit per-row codes times
    scales at ``keep_fp_bits=8``; none at 32), by layer name."""
    return {n: d.codes.float() * d.scale.float().view(-1, *([1] * (d.codes.dim() - 1)))
            for n, d in deployable_layers(model, keep_fp_bits).items() if d.quantizer is None}


def check_rounding(path: str | os.PathLike, model: nn.Module, net: nn.Module, x: Tensor,
                   weights: dict[str, Tensor] | None = None) -> dict:
    """:func:`rounding_parity` within its tolerances (:data:`POINT_TOLERANCE`, :data:`STEP_TOLERANCE`,
    :data:`CHANNEL_TOLERANCE`, :data:`LOGITS_TOLERANCE`), else an :class:`ExportError` naming the first
    point where the conversion is off; returns its result."""
    parity = rounding_parity(model, net, x, weights)
    if parity["failure"] is not None:
        raise ExportError(f"{path}: the exported network is not the trained model rounded to 8 bits: "
                          f"{parity['failure']}: a conversion error (removed)")
    return parity


@torch.no_grad()
def rounding_parity(model: nn.Module, net: nn.Module, x: Tensor, weights: dict[str, Tensor] | None = None) -> dict:
    """Hold the deployable network ``net`` to the trained ``model``, one rounding at a time.

    ``net`` rounds activations at ``net.rounding_points`` (:func:`~sqdist.export.int8.integer_deployable`).
    The model's own modules (no BatchNorm folded, no ReLU moved, the layers in ``weights`` given
    those weights: 8-bit stem and classifier; an integer layer's bias as int32 rounds it) compute
    each of those tensors from ``net``'s value of the one before, round it the same way, and are
    compared with ``net``'s value there; the model
    then goes on from ``net``'s value, so each comparison sees one step of the conversion alone
    (compared whole, two int8 computations of one network differ like int8 and float do: a code
    one step off early moves many later). What int8 arithmetic explains is a code one step off
    (the int32 bias, float32 requantization); a conversion error moves codes by many steps.

    Returns ``{"points", "worst_point", "worst_share", "worst_step_share", "worst_channel_steps",
    "logits_rel_error", "failure"}``: the largest shares of codes more than one step off and one
    step or more off at a point, the largest mean step of a channel (along dim 1 or the last),
    ``||model's logits - net's|| / ||net's||`` with every point taken from ``net``, and the first
    tolerance broken (a sentence) or None.
    """
    from .deployable import model_copy, unfuse_attention
    from .int8 import QMAX
    from .qdq import _FakeQuantize

    points = getattr(net, "rounding_points", [])
    twin = model_copy(model).cpu().float().eval()
    unfuse_attention(twin)  # the attention the export traces
    modules, theirs = dict(twin.named_modules()), dict(net.named_modules())
    for name, w in (weights or {}).items():
        weight = modules[name].weight
        weight.data = w.to(weight.dtype).reshape(weight.shape)
    values, hooks = {}, []
    for k, (_name, where, _s, _z, mine) in enumerate(points):
        if where != "input":
            hooks.append(theirs[mine].register_forward_hook(  # a copy: a later in-place add (x += shortcut) changes it
                lambda mod, args, out, k=k: values.setdefault(k, []).append(out.clone())))
    try:
        reference = net(x).float()
    finally:
        for h in hooks:
            h.remove()
    stats: list[tuple] = []  # (point, call, share > 1 step, share >= 1 step, largest |mean step| of a channel)

    def rounded(t, scale, zero_point):
        return _FakeQuantize.apply(t, scale, torch.tensor(zero_point, dtype=torch.uint8), 0, QMAX)

    calls: dict[int, int] = {}

    def at_point(out, k):  # a module called more than once (shared by several blocks): its calls in order
        name, _where, scale, zero_point, _mine = points[k]
        call = calls[k] = calls.get(k, -1) + 1
        given = values[k][call] if call < len(values.get(k, [])) else None
        shift = getattr(theirs[points[k][4]], "bias_rounding", None)  # an integer layer's int32 bias, rounded
        if shift is not None and out.dim() >= 1 and shift.numel() > 1:
            axis = 1 if getattr(theirs[points[k][4]], "is_conv", False) else out.dim() - 1
            out = out + shift.view(-1, *([1] * (out.dim() - 1 - axis)))
        ours = rounded(out, scale, zero_point)
        if given is None or given.shape != ours.shape:
            stats.append((name, call, 1.0, 1.0, float("inf")))
            return ours
        steps = ((ours - given) / scale).round()
        channel = max((float(steps.movedim(d, 0).reshape(steps.shape[d], -1).mean(1).abs().max())
                       for d in {1 % steps.dim(), steps.dim() - 1} if steps.numel()), default=0.0)
        stats.append((name, call, float((steps.abs() > 1).float().mean()) if steps.numel() else 0.0,
                      float((steps != 0).float().mean()) if steps.numel() else 0.0, channel))
        return given.clone()

    for k, (name, where, scale, zero_point, _mine) in enumerate(points):
        if where == "input":
            hooks.append(modules[name].register_forward_pre_hook(
                lambda mod, args, s=scale, z=zero_point: (rounded(args[0], s, z), *args[1:])))
        elif where == "before":
            hooks.append(modules[name].register_forward_pre_hook(lambda mod, args, k=k: (at_point(args[0], k),
                                                                                         *args[1:])))
        else:
            hooks.append(modules[name].register_forward_hook(lambda mod, args, out, k=k: at_point(out, k)))
    logits = twin(x).float()
    logits_error = float((logits - reference).norm() / reference.norm().clamp_min(1e-12))
    failure = None
    unvisited = [points[k][0] for k in values if calls.get(k, -1) + 1 != len(values[k])]
    for name, call, far, step, channel in stats:
        if far > POINT_TOLERANCE or step > STEP_TOLERANCE or channel > CHANNEL_TOLERANCE:
            failure = (f"at {name!r} (call {call + 1}) {100 * far:.1f}% of the codes are more than one step off "
                       f"(tolerance {100 * POINT_TOLERANCE:g}%), {100 * step:.1f}% one step or more (tolerance "
                       f"{100 * STEP_TOLERANCE:g}%), a channel {channel:.2f} steps on average (tolerance "
                       f"{CHANNEL_TOLERANCE})")
            break
    if failure is None and unvisited:
        failure = f"the model never computes {unvisited[0]!r} as often as the exported network does"
    if failure is None and not logits_error <= LOGITS_TOLERANCE:
        failure = f"logits {logits_error:.3g} off (relative; tolerance {LOGITS_TOLERANCE}) with every rounding given"
    worst = max(stats, key=lambda r: (r[2], r[3]), default=(None, 0, 0.0, 0.0, 0.0))
    return {"points": len(points), "worst_point": worst[0], "worst_share": worst[2], "worst_step_share": worst[3],
            "worst_channel_steps": max((r[4] for r in stats), default=0.0), "logits_rel_error": logits_error,
            "failure": failure}


def wide_weight_codes(net: nn.Module) -> list[str]:
    """The integer layers of ``net`` with a weight code above 64 in magnitude: onnxruntime's x86 u8s8
    kernels without VNNI sum two products in int16 (``VPMADDUBSW``), which 255 * (|w0| + |w1|) can
    saturate only then. With VNNI (or AMX) they sum in int32: bit for bit everywhere."""
    from .int8 import IntegerLayer

    return [n for n, m in net.named_modules() if isinstance(m, IntegerLayer) and int(m.codes.abs().max()) > 64]


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI or AMX (Linux ``/proc/cpuinfo``); None where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    if flags is None:
        return None
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
