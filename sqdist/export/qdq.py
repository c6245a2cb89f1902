"""The modules a deployable float model is made of: a weight computed from int8 codes and per-row
scales (:class:`WeightFromCodes`) and a fixed per-tensor input quantization (:class:`InputQuantizer`).

Both run as plain PyTorch and trace to ONNX ``DequantizeLinear`` / ``QuantizeLinear`` nodes
(:mod:`sqdist.export.onnx_writer`); :func:`sqdist.export.load_quantized` uses :class:`InputQuantizer`
for a layer whose input was quantized.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


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
        zp = zero_point.to(x.dtype)
        q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)  # round half to even, as QuantizeLinear
        return (q - zp) * scale

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
