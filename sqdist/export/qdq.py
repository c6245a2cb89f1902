"""The modules a deployable float model is made of: a weight computed from int8 codes and per-row
scales (:class:`WeightFromCodes`) and a fixed per-tensor input quantization (:class:`InputQuantizer`).

Both run as plain PyTorch and trace to ONNX ``DequantizeLinear`` / ``QuantizeLinear`` nodes
(:mod:`sqdist.export.onnx_writer`); :func:`sqdist.export.load_quantized` uses :class:`InputQuantizer`
for a layer whose input was quantized.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

# codes: |x / scale - (k + 1/2)| at or below this is a tie that float noise decides. torch and onnxruntime
# sum in different orders; before a quantizer deep in a BatchNorm network (repvit_m0_9) their values
# differ by up to ~5e-3 of a step, a wrong scale or zero point by whole steps.
TIE_WINDOW = 1e-2


class _ForcedCodes:
    """Codes a runtime chose, one entry per ``QuantizeLinear`` of the graph (None: not observed), and
    what taking them found: ``observed`` codes, ``ties``, ``flipped`` (ties decided the other way),
    ``near`` (one step off away from a tie; ``worst_near`` the largest share of that in one call),
    ``far`` (more than one step off), ``unmatched`` (calls whose codes had another shape)."""

    def __init__(self, codes: list[Tensor | None]):
        self.codes, self.calls, self.ties, self.flipped = codes, 0, 0, 0
        self.observed, self.near, self.far = 0, 0, 0
        self.worst_near, self.unmatched = 0.0, 0  # the largest share one step off in one call; codes of another shape


_FORCED: list[_ForcedCodes] = []


@contextlib.contextmanager
def forced_ties(codes: list[Tensor | None]):
    """Within this context every activation quantization (:func:`quantize_codes`, one call per
    ``QuantizeLinear`` of the exported graph, in graph order) computes its codes, counts how they
    differ from the runtime's ``codes`` (a tie within :data:`TIE_WINDOW` decided the other way, one
    step off elsewhere, more than one step off), then goes on with the runtime's codes. Yields the
    record (:class:`_ForcedCodes`).

    Why: a value near ``k + 1/2`` rounds either way depending on the order in which a runtime summed
    before it (torch and onnxruntime differ in the last bits; onnxruntime's float softmax and
    LayerNorm by more); the flipped code then moves every later layer by a full step. Going on from
    the runtime's codes compares each quantization on the same input, so every difference counted
    is one computation's own, not one inherited from an earlier layer.
    """
    record = _ForcedCodes(list(codes))
    _FORCED.append(record)
    try:
        yield record
    finally:
        _FORCED.remove(record)


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as float, ONNX ``QuantizeLinear``'s formula
    (a division, round half to even); see :func:`forced_ties`."""
    zp = zero_point.to(x.dtype) if isinstance(zero_point, Tensor) else float(zero_point)
    return round_codes(x / scale, zp, qmin, qmax)


def round_codes(t: Tensor, zero_point: float | Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(t) + zero_point, qmin, qmax)`` for ``t`` in units of one code: the rounding of one
    graph ``QuantizeLinear`` (or of a fused integer kernel's output); see :func:`forced_ties`."""
    q = torch.clamp(torch.round(t) + zero_point, qmin, qmax)
    if _FORCED:
        record = _FORCED[-1]
        theirs = record.codes[record.calls] if record.calls < len(record.codes) else None
        record.calls += 1
        if theirs is not None and theirs.shape != q.shape and theirs.dim() >= 3:
            # read in the other layout than the graph's analysis said (channels last or not): the shape tells
            theirs = next((o for o in (theirs.movedim(1, -1), theirs.movedim(-1, 1)) if o.shape == q.shape), theirs)
        if theirs is not None and theirs.shape != q.shape:
            record.unmatched += 1
        elif theirs is not None:
            theirs = torch.clamp(theirs.to(q.dtype), qmin, qmax)  # the graph's Clip (below 8 bits) follows
            tie = (t - torch.floor(t) - 0.5).abs() <= TIE_WINDOW
            steps = (theirs - q).abs()
            record.observed += q.numel()
            record.ties += int(tie.sum())
            record.flipped += int((tie & (steps > 0)).sum())
            near = int((~tie & (steps == 1)).sum())
            record.near += near
            record.worst_near = max(record.worst_near, near / max(q.numel(), 1))
            record.far += int((steps > 1).sum())
            q = theirs
    return q


class _DequantizeRows(torch.autograd.Function):
    """int8 ``codes`` (m, ...) times per-row ``scale`` (m,): the weight; ONNX ``DequantizeLinear`` (axis 0)."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return codes.to(scale.dtype) * scale.view(-1, *([1] * (codes.dim() - 1)))

    @staticmethod
    def symbolic(g, codes, scale, zero_point):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


class _FakeQuantize(torch.autograd.Function):
    """Per-tensor affine quantization of an activation.

    ONNX: ``QuantizeLinear`` [-> ``Clip``] -> ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        return (quantize_codes(x, scale, zero_point, qmin, qmax) - zero_point.to(x.dtype)) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        dtype = torch.int8 if qmin < 0 else torch.uint8
        info = torch.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):  # fewer than 8 bits: QuantizeLinear saturates at 8
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype)))
        return g.op("DequantizeLinear", q, scale, zero_point)


class WeightFromCodes(nn.Module):
    """Parametrization: the layer's weight is ``scale[:, None] * codes`` (its stored value is not used)."""

    def __init__(self, codes: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=torch.int8))

    def forward(self, _original: Tensor) -> Tensor:
        return _DequantizeRows.apply(self.codes, self.scale, self.zero_point)


class InputQuantizer(nn.Module):
    """Per-tensor activation quantization of a layer's input, as declared by ``activation_qparams()``."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        dtype = torch.int8 if qmin < 0 else torch.uint8
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(int(zero_point), dtype=dtype))
        self.qmin, self.qmax = int(qmin), int(qmax)

    def forward(self, x: Tensor) -> Tensor:
        return _FakeQuantize.apply(x, self.scale, self.zero_point, self.qmin, self.qmax)


def _quantize_input_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])
