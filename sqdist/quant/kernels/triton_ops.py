"""The GPU fast paths in Triton, with the same signatures as the compiled CPU ops (``csrc/sq_cpu.cpp``).

:mod:`sqdist.quant.kernels` hands tensors to these functions when ``SQDIST_KERNELS`` picks the
``triton`` backend (CUDA tensors under ``auto``/``cuda``, tensors on any device under ``triton``).
Each op is held by ``tests/quant/test_triton.py`` to its pure-PyTorch reference, which lives beside the
quantizer it serves (this module imports none of them: they import the kernels, not the other way):

===========================  ===================================================================
op                           reference
===========================  ===================================================================
``quantize`` (bwn/twn/kbit)  ``weights.bwn_reference`` / ``twn_reference`` / ``kbit_reference``,
                             ``weights.quantization_error``, ``torch.where(mask, Q, W)``
``mse_errors``               ``kbit_mse._best_ratio_reference`` (the errors it takes the argmin of)
``kbit_codes_at_ratio``      ``kbit_mse.kbit_codes_at_ratio_reference``
``lsq_forward/backward``     ``lsq.lsq_quantize_reference`` (autograd through straight-through ops)
===========================  ===================================================================

Without a GPU, ``TRITON_INTERPRET=1`` (set before this module is imported: ``triton.jit`` reads it
when it decorates) runs the same kernels on CPU tensors with numpy; that is how CI runs them.
Everything is computed in float32 (row sums in float64, as the CPU op does) with IEEE divisions and
no FMA contraction (:data:`EXACT`); rounding is half to even by :func:`_rint` (exact, and the same on
the GPU and in the interpreter); NaN propagates as in the references: a reduction does not rely on
``tl.max`` for NaN (it ignores NaN on the GPU, numpy does not), but on the row's sum of ``|w|``.
The gradients need no kernel of their own but LSQ's: the hybrid weight's is straight through
(``kernels._HybridWeight``). Plugins keep their kernels with them (ESB: ``sqdist_esb/esb_triton.py``).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

KIND_BWN, KIND_TWN, KIND_KBIT = 0, 1, 2
OUT_VALUES, OUT_CODES, OUT_SCALES, OUT_ERROR_CHANNEL, OUT_ERROR_ELEMENT = 1, 2, 4, 8, 16
MASK_ALL, MASK_ROW, MASK_ELEMENT = 0, 1, 2
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Launch options of every kernel: no a * b + c contracted into one FMA, so the products and differences
# round as the references' separate operations do (the divisions are tl.div_rn, IEEE round to nearest:
# Triton's `/` on float32 is the approximate div.full.f32)
EXACT = {"enable_fp_fusion": False}


def launch(kernel, grid: tuple, like: Tensor, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with :data:`EXACT`, on the GPU that holds ``like`` (Triton launches on
    the current device, which need not be the tensor's)."""
    with torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext():
        kernel[grid](*args, **kwargs, **EXACT)


@triton.jit
def _rint(y):
    """Round half to even (``torch.round``): floor, and up where the fraction is above 1/2 or is 1/2
    on an odd floor. ``y - floor(y)`` is exact, so this is exact for every float32; NaN stays NaN."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _clamp(y, lo, hi):
    """``torch.clamp``: NaN stays NaN (``tl.minimum`` alone would drop it on the GPU)."""
    return tl.clamp(y, lo, hi, propagate_nan=tl.PropagateNan.ALL)


# ---------------------------------------------------------------- quantize: codes, scales, Q, hybrid, errors
@triton.jit
def _quantize_rows(w_ptr, mask_ptr, thr_ptr, values_ptr, codes_ptr, scales_ptr, err_ptr, n, delta, levels,
                   KIND: tl.constexpr, MASK: tl.constexpr, LAYER_THR: tl.constexpr, VALUES: tl.constexpr,
                   CODES: tl.constexpr, SCALES: tl.constexpr, ERR_CH: tl.constexpr, ERR_EL: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program per row of a contiguous (m, n) weight: the row's statistics, then one pass writing
    what ``quantize`` asks for. The scale is rounded to the storage dtype before Q is formed, so Q, the
    codes and the errors describe the weight the model uses (the reference's ``codes * scale``)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    dtype = w_ptr.dtype.element_ty
    # pass 1: sum |w| (float64) and max |w|
    acc = tl.zeros([BLOCK], tl.float64)
    top = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        a = tl.abs(tl.load(w_ptr + base + offs, mask=offs < n, other=0.0).to(tl.float32))
        acc += a.to(tl.float64)
        top = tl.maximum(top, a)
    sum_abs = tl.sum(acc, axis=0)
    mean_abs = (sum_abs / n).to(tl.float32)
    thr = 0.0
    safe = 1.0
    if KIND == 0:  # BWN: mean |w|
        scale = mean_abs
    elif KIND == 1:  # TWN: mean |w| over |w| > thr
        if LAYER_THR:
            thr = tl.load(thr_ptr).to(tl.float32)
        else:
            thr = delta * mean_abs
        kept_sum = tl.zeros([BLOCK], tl.float64)
        kept = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            a = tl.abs(tl.load(w_ptr + base + offs, mask=offs < n, other=0.0).to(tl.float32))
            keep = (a > thr) & (offs < n)
            kept_sum += (a * keep.to(tl.float32)).to(tl.float64)  # a NaN |w| makes the scale NaN, as |w| * keep does
            kept += keep.to(tl.float32)
        scale = tl.div_rn(tl.sum(kept_sum, axis=0).to(tl.float32), tl.maximum(tl.sum(kept, axis=0), 1.0))
    else:  # k-bit: max |w| / L; a NaN in the row makes it NaN (tl.max ignores NaN on the GPU)
        amax = tl.where(sum_abs == sum_abs, tl.max(top, axis=0), float("nan"))
        scale = tl.div_rn(amax, levels)
        safe = tl.where(scale > 0.0, scale, 1.0)
    scale_t = scale.to(dtype)
    if SCALES:
        tl.store(scales_ptr + row, scale_t)
    sq = scale_t.to(tl.float32)
    row_q = True
    if MASK == 1:
        row_q = tl.load(mask_ptr + row) != 0
    # pass 2: codes, Q, the hybrid weight, the errors
    diff = tl.zeros([BLOCK], tl.float64)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < n
        wt = tl.load(w_ptr + base + offs, mask=ok, other=0.0)
        x = wt.to(tl.float32)
        if KIND == 0:
            c = tl.where(x >= 0.0, 1.0, -1.0)
        elif KIND == 1:
            sign = tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))  # torch.sign: 0 for 0 and NaN
            c = sign * (tl.abs(x) > thr).to(tl.float32)
        else:
            c = _rint(_clamp(tl.div_rn(x, safe), -levels, levels))
        q_t = (sq * c).to(dtype)
        e = tl.abs(x - q_t.to(tl.float32))
        if CODES:
            tl.store(codes_ptr + base + offs, c.to(dtype), mask=ok)
        if VALUES:
            if MASK == 2:
                sel = tl.load(mask_ptr + base + offs, mask=ok, other=0) != 0
            else:
                sel = row_q
            tl.store(values_ptr + base + offs, tl.where(sel, q_t, wt), mask=ok)
        if ERR_EL:
            a = tl.abs(x)
            rel = tl.where(a > 0.0, tl.div_rn(e, tl.maximum(a, 1.1754943508222875e-38)),
                           tl.where(e > 0.0, float("inf"), 0.0))
            tl.store(err_ptr + base + offs, rel, mask=ok)
        if ERR_CH:
            diff += tl.where(ok, e, 0.0).to(tl.float64)
    if ERR_CH:
        d = tl.sum(diff, axis=0).to(tl.float32)
        ref = sum_abs.to(tl.float32)
        rel = tl.where(ref > 0.0, tl.div_rn(d, tl.maximum(ref, 1.1754943508222875e-38)),
                       tl.where(d > 0.0, float("inf"), 0.0))
        tl.store(err_ptr + row, rel)


def _block(n: int, most: int = 2048) -> int:
    return max(16, min(triton.next_power_of_2(max(n, 1)), most))


def quantize(ws: list[Tensor], kind: int, delta: float, levels: int, layer_threshold: bool,
             masks: list[Tensor], outputs: int) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """``torch.ops.sqdist_cpu.quantize`` in Triton: for each contiguous (m, n) weight of ``ws`` the hybrid
    weight ``where(mask, Q, W)`` (``values``), the codes, the scales and the normalized L1 errors, each list
    empty when ``outputs`` does not ask for it. One launch per weight (a program per row).

    ``masks``: [] or one per weight: empty (all quantized), bool (m,) per row or (m, n) per element.
    ``layer_threshold``: TWN's ``delta * mean |W - mean W|`` over the weight (computed in PyTorch, as
    ``weights.twn_threshold`` does, and read by the kernel from device memory: no host sync).
    """
    if kind not in (KIND_BWN, KIND_TWN, KIND_KBIT):
        raise ValueError(f"sqdist quantize: kind={kind}; allowed: 0 (bwn), 1 (twn), 2 (kbit)")
    if kind == KIND_KBIT and levels < 1:
        raise ValueError(f"sqdist quantize: levels={levels}; allowed: >= 1")
    if not 0 < outputs < 32 or (outputs & OUT_ERROR_CHANNEL and outputs & OUT_ERROR_ELEMENT):
        raise ValueError(f"sqdist quantize: outputs={outputs}; allowed: bits of 1|2|4|8|16, one error kind")
    if masks and len(masks) != len(ws):
        raise ValueError(f"sqdist quantize: {len(masks)} masks for {len(ws)} weights; allowed: none or one per weight")
    out: tuple[list, list, list, list] = ([], [], [], [])
    for t, w in enumerate(ws):
        if w.dim() != 2 or not w.is_contiguous() or w.dtype not in DTYPES:
            raise ValueError(f"sqdist quantize: weight {t} has shape {list(w.shape)}, dtype {w.dtype}; "
                             "allowed: contiguous (m, n) float32, float16, bfloat16")
        m, n = w.shape
        mask = masks[t] if masks and masks[t].numel() > 0 else None
        mask_kind = MASK_ALL if mask is None else MASK_ROW if mask.shape == (m,) else MASK_ELEMENT
        if mask is not None and (mask.dtype != torch.bool or mask.shape not in ((m,), (m, n))):
            raise ValueError(f"sqdist quantize: mask {t} has shape {list(mask.shape)}, dtype {mask.dtype} for a "
                             f"weight {list(w.shape)}; allowed: bool (m,) or (m, n)")
        values = torch.empty_like(w) if outputs & OUT_VALUES else None
        codes = torch.empty_like(w) if outputs & OUT_CODES else None
        scales = w.new_empty(m) if outputs & OUT_SCALES else None
        error = (torch.empty(m, device=w.device) if outputs & OUT_ERROR_CHANNEL else
                 torch.empty(m, n, device=w.device) if outputs & OUT_ERROR_ELEMENT else None)
        for lst, o in zip(out, (values, codes, scales, error)):
            if o is not None:
                lst.append(o)
        if m == 0:
            continue
        layer = kind == KIND_TWN and layer_threshold
        thr = (delta * (w.float() - w.float().mean()).abs().mean()).reshape(1) if layer else w
        mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else w  # bool as bytes: one load path
        launch(_quantize_rows, (m,), w, w, mask_u8, thr, values if values is not None else w, codes if codes is not None else w,
                             scales if scales is not None else w, error if error is not None else w,
                             n, float(delta), float(levels), KIND=kind, MASK=mask_kind, LAYER_THR=layer,
                             VALUES=values is not None, CODES=codes is not None, SCALES=scales is not None,
                             ERR_CH=bool(outputs & OUT_ERROR_CHANNEL), ERR_EL=bool(outputs & OUT_ERROR_ELEMENT),
                             BLOCK=_block(n))
    return out


# ---------------------------------------------------------------- k-bit mse: the search's errors, the codes at a ratio
@triton.jit
def _mse_errors(w_ptr, safe_ptr, ratios_ptr, err_ptr, n, k, levels, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: the squared error of every candidate scale ``safe_i * ratios_ij`` while a block
    of the row is loaded once (the reference makes a pass over ``w`` per candidate)."""
    row = tl.program_id(0).to(tl.int64)
    cand = tl.arange(0, BLOCK_K)
    s = tl.load(safe_ptr + row) * tl.load(ratios_ptr + row * k + cand, mask=cand < k, other=1.0)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + row * n + offs, mask=offs < n, other=0.0)[None, :]
        d = _rint(_clamp(tl.div_rn(x, s[:, None]), -levels, levels)) * s[:, None] - x  # 0 past the row's end
        acc += tl.sum(d * d, axis=1)
    tl.store(err_ptr + row * k + cand, acc, mask=cand < k)


def mse_errors(w: Tensor, safe: Tensor, ratios: Tensor, levels: int) -> Tensor:
    """``torch.ops.sqdist_cpu.mse_errors`` in Triton: ``errors[i, j] = sum_e (clamp(round(w_ie / s_ij), -L, L)
    s_ij - w_ie)^2``, ``s_ij = safe_i * ratios_ij``; ``w`` (m, n) float32, ``safe`` (m,), ``ratios`` (m, k) -> (m, k)."""
    w, safe, ratios = w.contiguous(), safe.float().contiguous(), ratios.float().contiguous()
    (m, n), k = w.shape, ratios.shape[1]
    errors = torch.empty(m, k, device=w.device)
    if m and k:
        block_k = triton.next_power_of_2(k)
        launch(_mse_errors, (m,), w, w, safe, ratios, errors, n, k, float(levels), BLOCK_K=block_k,
               BLOCK=_block(n, max(16, 4096 // block_k)))
    return errors


@triton.jit
def _codes_at_ratio(w_ptr, ratio_ptr, out_ptr, scales_ptr, n, levels, VALUES: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: ``scale = ratio * max|w| / L`` (0 for a zero row), then the codes (or ``codes * scale``)."""
    row = tl.program_id(0).to(tl.int64)
    top = tl.zeros([BLOCK], tl.float32)
    nan = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + row * n + offs, mask=offs < n, other=0.0)
        top = tl.maximum(top, tl.abs(x))
        nan = tl.maximum(nan, (x != x).to(tl.int32))
    row_top = tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(top, axis=0))
    row_top = tl.div_rn(row_top, levels)  # NaN as torch's amax
    divisor = tl.where(row_top > 0.0, row_top, 1.0) * tl.load(ratio_ptr + row)
    scale = tl.where(row_top > 0.0, divisor, 0.0)
    tl.store(scales_ptr + row, scale)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(w_ptr + row * n + offs, mask=offs < n, other=0.0)
        c = _rint(_clamp(tl.div_rn(x, divisor), -levels, levels))
        if VALUES:
            c = c * scale
        tl.store(out_ptr + row * n + offs, c, mask=offs < n)


def kbit_codes_at_ratio(w: Tensor, ratio: Tensor, levels: int, values: bool = False) -> tuple[Tensor, Tensor]:
    """``torch.ops.sqdist_cpu.kbit_codes_at_ratio`` in Triton: ``w`` (m, n) float32, ``ratio`` (m,) ->
    (codes, or ``codes * scale`` with ``values``, (m, n); scales (m,))."""
    w, ratio = w.contiguous(), ratio.float().contiguous()
    m, n = w.shape
    out, scales = torch.empty_like(w), w.new_empty(m)
    if m:
        launch(_codes_at_ratio, (m,), w, w, ratio, out, scales, n, float(levels), VALUES=values, BLOCK=_block(n))
    return out, scales


# ---------------------------------------------------------------- LSQ
LSQ_BLOCK = 1024


@triton.jit
def _lsq_forward(x_ptr, y_ptr, step_ptr, numel, lo, hi, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(step_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0)
    tl.store(y_ptr + offs, _rint(_clamp(tl.div_rn(x, s), lo, hi)) * s, mask=offs < numel)


@triton.jit
def _lsq_backward(x_ptr, g_ptr, gx_ptr, partial_ptr, step_ptr, numel, lo, hi, BLOCK: tl.constexpr):
    """``dL/dx = dL/dy`` where ``lo < x/s < hi`` (0 outside, and for NaN); one partial sum of the step's
    gradient ``dL/dy (round(clamp(v)) - v inside, the bound outside)`` per block, in float64."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    s = tl.load(step_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    v = tl.div_rn(x, s)
    inside = (v > lo) & (v < hi)
    term = _rint(_clamp(v, lo, hi)) - tl.where(inside, v, 0.0)
    tl.store(gx_ptr + offs, tl.where(inside, g, 0.0), mask=ok)
    tl.store(partial_ptr + pid, tl.sum(tl.where(ok, g * term, 0.0).to(tl.float64), axis=0))


def lsq_forward(x: Tensor, step: Tensor, qmin: int, qmax: int) -> Tensor:
    """``torch.ops.sqdist_cpu.lsq_forward`` in Triton: ``round(clamp(x / s, qmin, qmax)) * s``, ``x`` float32 any
    shape, ``step`` one value (read on the device: no host sync)."""
    if step.numel() != 1:
        raise ValueError(f"lsq: {step.numel()} step values; allowed: one step per tensor")
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        launch(_lsq_forward, (triton.cdiv(x.numel(), LSQ_BLOCK),), x, x, y, step.detach().reshape(1), x.numel(),
               float(qmin), float(qmax), BLOCK=LSQ_BLOCK)
    return y


def lsq_backward(x: Tensor, grad: Tensor, step: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """``torch.ops.sqdist_cpu.lsq_backward`` in Triton: (``dL/dx``, the step's unscaled gradient sum as a
    float64 scalar tensor). The per-block partial sums add in a fixed order: the same total every run."""
    if step.numel() != 1:
        raise ValueError(f"lsq: {step.numel()} step values; allowed: one step per tensor")
    x, grad = x.contiguous(), grad.contiguous()
    if x.shape != grad.shape:
        raise ValueError(f"lsq: x {list(x.shape)} and its gradient {list(grad.shape)}; allowed: one gradient per element")
    gx = torch.empty_like(x)
    blocks = triton.cdiv(x.numel(), LSQ_BLOCK)
    partial = torch.zeros(max(blocks, 1), dtype=torch.float64, device=x.device)
    if blocks:
        launch(_lsq_backward, (blocks,), x, x, grad, gx, partial, step.detach().reshape(1), x.numel(), float(qmin),
               float(qmax), BLOCK=LSQ_BLOCK)
    return gx, partial.sum()


# True when TRITON_INTERPRET=1 was set as this module was imported: the kernels then run on CPU tensors
INTERPRETED = type(_rint).__name__ == "InterpretedFunction"
