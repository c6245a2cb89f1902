"""Fused SQ kernels (csrc/), chosen by ``SQDIST_KERNELS=reference|cpu|cuda|auto``.

One compiled op per device, ``torch.ops.sqdist_cpu.quantize`` (C++/OpenMP) and
``torch.ops.sqdist_cuda.quantize`` (sm_80/sm_90), computes for every row of a
list of ``(m, n)`` weights, in one pass over memory after the per-row statistics:
the codes, the scale, ``Q``, the hybrid weight ``where(mask, Q, W)`` and the
normalized L1 error. ``torch.ops.sqdist_cpu.mse_errors`` is k-bit ``mse``'s scale
search (:mod:`sqdist.quant.kbit_mse`), every candidate of a row in one pass. The
pure-PyTorch references in :mod:`sqdist.quant.weights` and :mod:`sqdist.quant.kbit_mse`
stay the ground truth (``tests/test_kernels.py`` holds the kernels to them).

``SQDIST_KERNELS`` (default ``auto``), read at every call:

- ``reference``: always the PyTorch reference;
- ``cpu`` / ``cuda``: the compiled op for tensors on that device, the reference elsewhere;
- ``auto``: the compiled op of the tensor's device (cpu or cuda) when it is available.

The compiled ops come from an install-time build or are JIT-built once into a
cache (see :mod:`sqdist.quant.kernels._build`). When one cannot be built or loaded,
sqdist warns once and uses the reference: the kernels are never required.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

MODES = ("reference", "cpu", "cuda", "auto")
KINDS = {"bwn": 0, "twn": 1, "kbit": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bits of the op's `outputs` argument (csrc/sq_common.h)
OUT_VALUES, OUT_CODES, OUT_SCALES, OUT_ERROR_CHANNEL, OUT_ERROR_ELEMENT = 1, 2, 4, 8, 16

_ops: dict[str, object | None] = {}


def mode() -> str:
    """The kernel choice from ``SQDIST_KERNELS`` (default ``auto``)."""
    value = os.environ.get("SQDIST_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"SQDIST_KERNELS={value!r}; allowed: {', '.join(MODES)}")
    return value


def ops(backend: str):
    """The loaded op namespace of ``backend`` (``cpu`` or ``cuda``), or None if unavailable.

    The first call builds or loads it; a failure warns once and is remembered.
    """
    if backend not in _ops:
        from . import _build

        try:
            _ops[backend] = _build.load(backend)
        except Exception as exc:  # any build/load failure means: use the reference
            reason = str(exc).strip().splitlines()
            reason = reason[-1] if reason else type(exc).__name__
            warnings.warn(f"sqdist: the compiled {backend} SQ kernels are unavailable ({reason}); "
                          "using the PyTorch reference (set SQDIST_KERNELS=reference to silence this)",
                          RuntimeWarning, stacklevel=2)
            _ops[backend] = None
    return _ops[backend]


def backend_for(t: Tensor) -> str | None:
    """``"cpu"`` or ``"cuda"`` when a compiled op serves tensor ``t``, else None (reference)."""
    m = mode()
    dev = t.device.type
    if m == "reference" or dev not in ("cpu", "cuda") or t.dtype not in DTYPES:
        return None
    if m != "auto" and m != dev:
        return None
    return dev if ops(dev) is not None else None


def cpu_op(name: str, t: Tensor):
    """The compiled CPU op ``torch.ops.sqdist_cpu.<name>`` for a float32 tensor ``t`` on the CPU, when
    ``SQDIST_KERNELS`` allows it and the library has it; else None (the caller's PyTorch form)."""
    if t.dtype != torch.float32 or backend_for(t) != "cpu":
        return None
    return getattr(ops("cpu"), name, None)


class Fused(NamedTuple):
    """Results of :func:`quantize_many`, one entry per weight (empty lists when not asked)."""

    values: list[Tensor]  # (m, n), dtype of w: the hybrid weight (Q where masked, W elsewhere)
    codes: list[Tensor]   # (m, n), dtype of w, integer-valued
    scales: list[Tensor]  # (m,), dtype of w
    errors: list[Tensor]  # (m,) or (m, n), float32


def spec_args(kind: str, delta: float = 0.7, bits: int = 4, threshold: str = "row") -> tuple:
    """(kind id, delta, levels, layer_threshold) as the op takes them."""
    return KINDS[kind], float(delta), 2 ** (int(bits) - 1) - 1, threshold == "layer"


def quantize_many(ws: Sequence[Tensor], kind: str, *, delta: float = 0.7, bits: int = 4,
                  threshold: str = "row", masks: Sequence[Tensor | None] | None = None,
                  values: bool = False, codes: bool = False, scales: bool = False,
                  error: str | None = None) -> Fused | None:
    """Run the fused op on weights ``ws`` (each (m, n), any layout) in as few launches as
    their devices and dtypes allow; None when no compiled op serves them all.

    Args:
        kind: ``bwn``, ``twn`` or ``kbit`` (with ``delta``/``threshold`` or ``bits``).
        masks: per weight, None (all quantized) or bool (m,) per row / (m, n) per element;
            ``values`` then is the hybrid weight ``where(mask, Q, W)``.
        error: None, ``channel`` ((m,) per weight) or ``element`` ((m, n)).
    """
    ws = list(ws)
    if not ws or any(backend_for(w) is None for w in ws):
        return None
    outputs = (OUT_VALUES * values | OUT_CODES * codes | OUT_SCALES * scales
               | (OUT_ERROR_CHANNEL if error == "channel" else 0)
               | (OUT_ERROR_ELEMENT if error == "element" else 0))
    if error not in (None, "channel", "element"):
        raise ValueError(f"error={error!r}; allowed: None, 'channel', 'element'")
    if outputs == 0:
        return Fused([], [], [], [])
    args = spec_args(kind, delta, bits, threshold)
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(ws):
        groups.setdefault((w.device, w.dtype), []).append(i)
    out = [[None] * len(ws) for _ in range(4)]
    for (device, _), idx in groups.items():
        op = ops(device.type).quantize
        gw = [ws[i].detach().reshape(ws[i].shape[0], math.prod(ws[i].shape[1:])).contiguous() for i in idx]
        gm = [] if masks is None else [
            torch.empty(0, dtype=torch.bool, device=device) if masks[i] is None
            else masks[i].to(device=device, dtype=torch.bool).contiguous() for i in idx]
        res = op(gw, *args, gm, outputs)
        for k in range(4):
            for i, t in zip(idx, res[k]):
                out[k][i] = t
    return Fused(*[[t for t in o if t is not None] for o in out])


class _HybridWeight(torch.autograd.Function):
    """``W~ = where(mask, Q, W)`` by the fused op; the gradient passes to ``W`` unchanged
    (straight through for quantized entries, exact for the others)."""

    @staticmethod
    def forward(ctx, weight, kind, delta, bits, threshold, mask):
        w2d = weight.reshape(weight.shape[0], -1)
        res = quantize_many([w2d], kind, delta=delta, bits=bits, threshold=threshold,
                            masks=None if mask is None else [mask], values=True)
        return res.values[0].view(weight.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None


def hybrid_weight(weight: Tensor, kind: str, mask: Tensor | None = None, *, delta: float = 0.7,
                  bits: int = 4, threshold: str = "row") -> Tensor | None:
    """Fused hybrid weight of ``weight`` (any shape, dim 0 = rows) with straight-through
    gradient, or None when no compiled op serves it.

    ``mask``: None (all quantized), bool (rows,) or the weight's own shape per element.
    """
    if backend_for(weight) is None:
        return None
    if mask is not None and mask.dim() > 1:
        mask = mask.reshape(weight.shape[0], -1)
    return _HybridWeight.apply(weight, kind, delta, bits, threshold, mask)


def get(name: str, device: torch.device | str | None = None):
    """The fused ``codes, scale`` op for quantizer ``name`` on ``device``, or None.

    Signatures: ``bwn(w)``, ``twn(w, delta, layer_threshold)``, ``kbit(w, bits)``; ``w`` is (m, n).
    """
    if name not in KINDS:
        return None
    probe = torch.empty(0, device=device or "cpu")
    if backend_for(probe) is None:
        return None

    def op(w: Tensor, *params):
        if name == "twn":
            kw = dict(delta=params[0], threshold="layer" if params[1] else "row")
        elif name == "kbit":
            kw = dict(bits=params[0])
        else:
            kw = {}
        res = quantize_many([w], name, codes=True, scales=True, **kw)
        if res is None:
            return None
        return res.codes[0], res.scales[0]

    return op
