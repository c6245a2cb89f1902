"""Fake (meta) kernels of the compiled CPU ops, so ``torch.compile`` traces through them.

``torch.ops.sqdist_cpu`` is registered in C++ (``TORCH_LIBRARY`` in ``csrc/sq_cpu.cpp``) with a CPU
kernel only. Under ``torch.compile`` the tracer runs every op on fake tensors (shapes, dtypes, no data)
and an op without a fake kernel stops the graph ("does not support running with fake tensors"). The
functions here give each op its output shapes, exactly as the C++ allocates them; they are registered
once, when :func:`sqdist.quant.kernels._build.load` loads the library.
"""
from __future__ import annotations

import torch
from torch import Tensor

OUT_VALUES, OUT_CODES, OUT_SCALES, OUT_ERROR_CHANNEL, OUT_ERROR_ELEMENT = 1, 2, 4, 8, 16  # csrc/sq_common.h


def quantize_fake(ws: list[Tensor], kind: int, delta: float, levels: int, layer_threshold: bool,
                  masks: list[Tensor], outputs: int):
    """``quantize``: per (m, n) weight, the asked-for outputs (values, codes: (m, n) like w; scales (m,);
    errors float32 (m,) per row or (m, n) per element); an output not asked for is an empty list."""
    values, codes, scales, errors = [], [], [], []
    for w in ws:
        m = w.shape[0]
        if outputs & OUT_VALUES:
            values.append(w.new_empty(w.shape))
        if outputs & OUT_CODES:
            codes.append(w.new_empty(w.shape))
        if outputs & OUT_SCALES:
            scales.append(w.new_empty((m,)))
        if outputs & OUT_ERROR_CHANNEL:
            errors.append(w.new_empty((m,), dtype=torch.float32))
        elif outputs & OUT_ERROR_ELEMENT:
            errors.append(w.new_empty(w.shape, dtype=torch.float32))
    return values, codes, scales, errors


def mse_errors_fake(w: Tensor, safe: Tensor, ratios: Tensor, levels: int) -> Tensor:
    return w.new_empty((w.shape[0], ratios.shape[1]))


def kbit_codes_at_ratio_fake(w: Tensor, ratio: Tensor, levels: int, values: bool = False):
    return w.new_empty(w.shape), w.new_empty((w.shape[0],))


def lsq_forward_fake(x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
    return x.new_empty(x.shape)


def lsq_backward_fake(x: Tensor, grad: Tensor, step: Tensor, qmin: int, qmax: int):
    return x.new_empty(x.shape), x.new_empty((), dtype=torch.float64)


FAKES = {"quantize": quantize_fake, "mse_errors": mse_errors_fake, "kbit_codes_at_ratio": kbit_codes_at_ratio_fake,
         "lsq_forward": lsq_forward_fake, "lsq_backward": lsq_backward_fake}


def register_fakes(namespace: str = "sqdist_cpu") -> None:
    """Register :data:`FAKES` for the ops of ``namespace`` (once; a second call is a no-op)."""
    for name, fn in FAKES.items():
        qualname = f"{namespace}::{name}"
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta") or qualname in _registered:
            continue
        torch.library.register_fake(qualname, fn)
        _registered.add(qualname)


_registered: set[str] = set()
