"""ESB's quantization between two scale searches on the GPU: :func:`sqdist_esb.esb_codes_refined` as a Triton
kernel, held to :func:`sqdist_esb.esb_codes_refined_reference` (``tests/quant/test_triton.py``), the Triton twin of
``esb_cpu.cpp``. Imported only where a tensor asks for it (it imports triton).

Two passes a row: the levels ``c = esb_round(w / scale)`` (|v| with its float mantissa rounded to
``linear_bits`` bits by an integer add and mask on its bits; below 1, |v| + 1 rounded, minus 1; capped at the
top level; v's sign) and the sums ``<w, c>``, ``<c, c>`` in float64; then the refitted scale ``<w, c> / <c, c>``
(the kept scale where ``c = 0``) and ``c``, or ``c * s``. Same float32 roundings as the reference (IEEE
division, no FMA contraction); the sums add in another order, in double as there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sqdist.quant.kernels.triton_ops import launch


@triton.jit
def _levels(x, safe, add, mask, top, keep):
    v = tl.div_rn(x, safe)
    a = tl.abs(v)
    small = (a < 1.0).to(tl.float32)
    a = a + small
    a = ((a.to(tl.int32, bitcast=True) + add) & mask).to(tl.float32, bitcast=True)
    a = tl.minimum(a - small, top, propagate_nan=tl.PropagateNan.ALL)
    c = tl.where(v.to(tl.int32, bitcast=True) < 0, -a, a)  # copysign: -0.0 and a negative NaN count as negative
    return tl.where(keep, c, c * 0.0)  # the reference's c * (scale > 0): 0 with c's sign, NaN stays


@triton.jit
def _refined(w_ptr, scale_ptr, out_ptr, s_ptr, n, add, mask, top, VALUES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s0 = tl.load(scale_ptr + row)
    keep = s0 > 0.0
    safe = tl.where(keep, s0, 1.0)
    num = tl.zeros([BLOCK], tl.float64)
    den = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + row * n + offs, mask=offs < n, other=0.0)
        c = _levels(x, safe, add, mask, top, keep)
        num += x.to(tl.float64) * c.to(tl.float64)
        den += c.to(tl.float64) * c.to(tl.float64)
        if not VALUES:
            tl.store(out_ptr + row * n + offs, c, mask=offs < n)
    numf = tl.sum(num, axis=0).to(tl.float32)
    denf = tl.sum(den, axis=0).to(tl.float32)
    s = tl.where(denf > 0.0, tl.div_rn(numf, tl.maximum(denf, 1e-30)), s0)
    tl.store(s_ptr + row, s)
    if VALUES:
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(w_ptr + row * n + offs, mask=offs < n, other=0.0)
            tl.store(out_ptr + row * n + offs, _levels(x, safe, add, mask, top, keep) * s, mask=offs < n)


def refined(w: Tensor, scale: Tensor, linear_bits: int, top: float, values: bool = False) -> tuple[Tensor, Tensor]:
    """``(c or c * s, s)`` for ``w`` (m, n) float32 and the kept scales ``scale`` (m,): ``esb_cpu.refined``'s
    signature."""
    if w.dim() != 2 or w.dtype != torch.float32 or not 0 <= linear_bits < 22:
        raise ValueError(f"esb refined: w {list(w.shape)} {w.dtype}, linear_bits={linear_bits}; "
                         "allowed: (m, n) float32, linear_bits in [0, 22)")
    w, scale = w.contiguous(), scale.float().contiguous()
    m, n = w.shape
    out, s = torch.empty_like(w), torch.empty(m, device=w.device)
    add = (1 << (22 - linear_bits)) - 1
    mask = ~((1 << (23 - linear_bits)) - 1)  # negative: the same bits as the reference's int32 mask
    if m:
        launch(_refined, (m,), w, w, scale, out, s, n, add, mask, float(top), VALUES=values,
               BLOCK=max(16, min(triton.next_power_of_2(max(n, 1)), 2048)))
    return out, s
