"""Fused SQ kernels, chosen by ``SQDIST_KERNELS=reference|cpu|cuda|triton|auto``.

Two fast backends, each beside the pure-PyTorch references (in :mod:`sqdist.quant.weights`,
:mod:`sqdist.quant.kbit_mse`, :mod:`sqdist.quant.lsq`), which stay the ground truth the tests hold
them to:

- ``cpu``: the compiled C++/OpenMP library ``torch.ops.sqdist_cpu`` (``csrc/sq_cpu.cpp``);
- ``triton``: the Triton kernels of :mod:`sqdist.quant.kernels.triton_ops` (the GPU path; on CPU
  tensors they run only under ``TRITON_INTERPRET=1``, which is how CI runs them).

Both offer the same ops with the same signatures: ``quantize`` (for every row of a list of ``(m, n)``
weights, in one pass over memory after the per-row statistics: the codes, the scale, ``Q``, the hybrid
weight ``where(mask, Q, W)`` and the normalized L1 error), ``mse_errors`` (k-bit ``mse``'s scale search,
every candidate of a row in one pass), ``kbit_codes_at_ratio`` and ``lsq_forward`` / ``lsq_backward``.

``SQDIST_KERNELS`` (default ``auto``), read at every call:

- ``reference``: always the PyTorch reference;
- ``cpu``: the C++ ops for CPU tensors, the reference elsewhere;
- ``cuda``: the Triton kernels for CUDA tensors, the reference elsewhere;
- ``triton``: the Triton kernels for tensors on any device (CPU ones under ``TRITON_INTERPRET=1``);
- ``auto``: the C++ ops on the CPU, the Triton kernels on CUDA.

The C++ ops come from an install-time build or are JIT-built once into a cache (see
:mod:`sqdist.quant.kernels._build`); Triton compiles its kernels on first use. When a backend cannot
be built or imported, sqdist warns once and uses the reference: the kernels are never required.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

MODES = ("reference", "cpu", "cuda", "triton", "auto")
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
    """The op namespace of ``backend`` (``cpu``: ``torch.ops.sqdist_cpu``; ``triton``: the module
    :mod:`sqdist.quant.kernels.triton_ops`), or None if unavailable.

    The first call builds, loads or imports it; a failure warns once and is remembered.
    """
    if backend not in _ops:
        try:
            if backend == "triton":
                from . import triton_ops  # imports triton: only where a tensor asks for it

                _ops[backend] = triton_ops
            else:
                from . import _build

                _ops[backend] = _build.load(backend)
        except Exception as exc:  # any build/load/import failure means: use the reference
            reason = str(exc).strip().splitlines()
            reason = reason[-1] if reason else type(exc).__name__
            what = "Triton" if backend == "triton" else f"compiled {backend}"
            warnings.warn(f"sqdist: the {what} SQ kernels are unavailable ({reason}); "
                          "using the PyTorch reference (set SQDIST_KERNELS=reference to silence this)",
                          RuntimeWarning, stacklevel=2)
            _ops[backend] = None
    return _ops[backend]


def load_source(src, flags: tuple[str, ...] | None = None):
    """A plugin's one-file CPU extension (pybind11 module, source path ``src``) built on first use into the
    kernel cache, keyed on its source, torch and the flags; None (and a warning) where it cannot be built, so
    the caller takes its PyTorch path. Once per process and source. The public face of
    :func:`sqdist.quant.kernels._build.load_source` (importing it does not import the build machinery)."""
    from . import _build

    return _build.load_source(src) if flags is None else _build.load_source(src, tuple(flags))


def plugin_kernel(src, module: str | None = None):
    """``(kernel, kernel_available)`` for a plugin's one-file CPU extension at ``src``: ``kernel()`` is
    :func:`load_source` of it (the module, or None where it cannot be built); ``kernel_available()`` whether it
    can be, a constant to ``torch.compile`` (which cannot trace the build). A plugin writes
    ``kernel, kernel_available = plugin_kernel(Path(__file__).with_name("x_cpu.cpp"), __name__)`` (``module``:
    the functions' ``__module__``, so documentation tools list them with the plugin)."""

    def kernel():
        return load_source(src)

    @torch.compiler.assume_constant_result
    def kernel_available() -> bool:
        return kernel() is not None

    name = getattr(src, "name", src)
    kernel.__doc__ = f"The compiled CPU kernels of ``{name}``, built on first use; None where they cannot be built."
    kernel_available.__doc__ = ("Whether :func:`kernel` can be built: a constant to ``torch.compile`` (which cannot "
                                "trace the build).")
    for f in (kernel, kernel_available):
        f.__qualname__ = f.__name__
        f.__module__ = module or f.__module__
    return kernel, kernel_available


def backend_for(t: Tensor) -> str | None:
    """``"cpu"`` (the C++ ops) or ``"triton"`` when a fast op serves tensor ``t``, else None (reference)."""
    m = mode()
    dev = t.device.type
    if m == "reference" or t.dtype not in DTYPES:
        return None
    if m == "triton":
        # a CPU tensor only when the interpreter runs the kernels (a compiled Triton kernel needs a GPU)
        interpreted = dev == "cpu" and ops("triton") is not None and ops("triton").INTERPRETED
        backend = "triton" if dev == "cuda" or interpreted else None
    elif dev == "cpu" and m in ("auto", "cpu"):
        backend = "cpu"
    elif dev == "cuda" and m in ("auto", "cuda"):
        backend = "triton"
    else:
        return None
    return backend if backend is not None and ops(backend) is not None else None


def preload(tensors) -> None:
    """Load (build, import) the fast ops that would serve ``tensors`` now, so that ``torch.compile`` does not
    trace their first load: a load inside a trace is a graph break, and the graph stays split there for
    every later step (:func:`sqdist.train.compiling.compile_model` calls this before compiling)."""
    for device in {(t.device, t.dtype) for t in tensors}:
        backend_for(torch.empty(0, device=device[0], dtype=device[1]))


def fast_op(name: str, t: Tensor):
    """The fast op ``<name>`` (``mse_errors``, ``kbit_codes_at_ratio``, ``lsq_forward``, ``lsq_backward``) for a
    float32 tensor ``t``: the C++ op on the CPU, the Triton kernel on CUDA, as ``SQDIST_KERNELS`` allows;
    else None (the caller's PyTorch form)."""
    backend = backend_for(t) if t.dtype == torch.float32 else None
    return getattr(ops(backend), name, None) if backend is not None else None


def cpu_op(name: str, t: Tensor):
    """:func:`fast_op` when it is the compiled CPU op ``torch.ops.sqdist_cpu.<name>``, else None."""
    return fast_op(name, t) if backend_for(t) == "cpu" else None


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
    """Run the fused op on weights ``ws`` (each (m, n), any layout), one call per backend, device and
    dtype (the C++ op loops over all its weights; Triton launches once per weight); None when no fast op
    serves them all.

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
        groups.setdefault((backend_for(w), w.device, w.dtype), []).append(i)
    out = [[None] * len(ws) for _ in range(4)]
    for (backend, device, _), idx in groups.items():
        op = ops(backend).quantize
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
    gradient, or None when no fast op serves it.

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
