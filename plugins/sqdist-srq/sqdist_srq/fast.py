"""SRQ's estimator at layer scale: a window of codes, a hand-written backward, a fused CPU kernel.

The full-grid reference (``_srq_reference`` in ``__init__``) builds ``pi`` as a ``(numel, 2^B)``
tensor and lets autograd go through a dozen ops on it. Here the forward is only the mode
(``clamp(round(u))``: nothing else is needed for the value) and the backward computes, per
element and over a window of codes around the mode only, ``dE/du`` and ``dE/dtau`` from the
closed forms (``E = sum_k k pi_k``, ``l_k = log pi_k + const``)::

    pi_k ∝ F_k G_{k-1},  F_k = sigmoid(t_k), G_k = 1 - F_k,  t_k = (k + 1/2 - u) / tau
    dE/du   = Cov_pi(k, dl_k/du)   = Cov_pi(k, F_{k-1} - G_k) / tau
    dE/dtau = Cov_pi(k, dl_k/dtau) = Cov_pi(k, F_{k-1} t_{k-1} - G_k t_k) / tau

(``sigmoid(t_k) - sigmoid(t_{k-1}) = F_k G_{k-1} (1 - e^{-1/tau})``: a product, no cancellation).
The CPU kernel (``srq_cpu.cpp``, built on first use into ``$SQDIST_KERNEL_CACHE``) runs that in one
pass; on a large tensor it computes ``dE/du`` and ``dE/dtau`` once per node of a table over ``u``
(spacing ``tau / 32``; they depend on ``u`` and the level's ``tau`` only) and each element
interpolates it (cubic: an error below float32 rounding; ``table_spacing`` decides per level).
The pure-PyTorch path below (any device, or when the kernel cannot be built) loops over the
window's offsets with ``numel``-sized tensors only. ``SQDIST_KERNELS`` picks (:func:`mode`, read at every
call; ``reference`` is handled by the quantizers).

A grid *level* is ``(mult, qmin, qmax, offset)``: step ``alpha * mult``, points
``alpha * mult * (k + offset)`` for codes ``k`` in ``[qmin, qmax]``; one call quantizes each
element on the level ``index[e]`` names (DropBits, learned widths) in one pass.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from sqdist.plugin import kernel_mode, plugin_kernel

TAU_FLOOR = 1e-12
NEGLECTED_MASS = 2.0 ** -24  # the window leaves out less than this fraction of pi: below float32 rounding of 1
CLAMP_TAUS = 20.0  # u is clamped 20 tau beyond the outer boundaries: pi then moves by < e^-20 relative
MODES = ("auto", "cpu", "torch", "reference")
TABLE_NODES_PER_TAU = 32  # the kernel's table of dE/du, dE/dtau over u: spacing tau / 32 (cubic: below float32 rounding)
TABLE_ELEMENTS_PER_NODE = 4  # tabulate a level only when the call has at least this many elements per node
TABLE_MAX_NODES = 1 << 20


class Level(NamedTuple):
    """One grid: step ``alpha * mult``, points ``alpha * mult * (k + offset)``, ``k`` in ``[qmin, qmax]``."""

    mult: float
    qmin: int
    qmax: int
    offset: float = 0.0


def mode() -> str:
    """``auto``, ``cpu`` (the compiled op on CPU tensors), ``torch`` (the same algorithm in PyTorch: what runs on
    CUDA, and everywhere under ``SQDIST_KERNELS=cuda|triton``) or ``reference`` (``SQDIST_KERNELS=reference``: the
    implementation before the fast path). The old ``SQDIST_SRQ_KERNEL`` is still read, with a DeprecationWarning."""
    m = kernel_mode("SQDIST_SRQ_KERNEL")
    m = {"cuda": "torch", "triton": "torch"}.get(m, m)
    if m not in MODES:
        raise ValueError(f"SQDIST_SRQ_KERNEL={m!r}; allowed: {', '.join(MODES)} (deprecated: set SQDIST_KERNELS)")
    return m


def window_half_width(tau: float, codes: int) -> int:
    """The half width ``K`` of the window ``[c - K, c + K]`` around the mode ``c`` outside which the
    codes hold less than ``NEGLECTED_MASS`` of ``pi`` (``codes``: the grid's size, the cap).

    Why (``S(t) = sigmoid(-t / tau)``: the noise mass beyond ``t`` (in code units), ``m(t) = S(t) -
    S(t + 1)``: of a unit interval starting ``t``). Inside the grid the mode's interval holds ``u``,
    so its mass is at least ``m(0)``, and the codes more than ``K`` steps to one side have disjoint
    intervals beyond ``K``: at most ``S(K)`` each side, ``2 S(K) / m(0)`` of ``Z`` in all. Outside the
    grid (mode interval ``t0 >= 0`` away) the codes beyond ``K`` hold ``S(t0 + K + 1)`` against
    ``m(t0)``, a ratio that falls with ``t0`` (the logistic is log-concave: ``S(t0 + a) / S(t0)``
    falls), so at most ``S(K + 1) / m(0)``. ``K`` is the least with ``2 S(K) / m(0)`` below
    ``NEGLECTED_MASS`` (``plugins/sqdist-srq/tests/test_srq.py`` checks it against the full grid in float64)."""
    if not tau > 0 or not math.isfinite(tau):
        return codes
    m0 = 1.0 / (1.0 + math.exp(-1.0 / tau)) - 0.5 if tau > 1e-3 else 0.5
    if m0 <= 0:
        return codes
    q = NEGLECTED_MASS * m0 / 2.0  # S(K) <= q  <=>  K >= tau log((1 - q) / q)
    k = math.ceil(tau * math.log((1.0 - q) / q))
    return int(min(max(k, 1), codes))


def table_spacing(tau: float, level: Level, numel: int) -> float:
    """The spacing in ``u`` of the kernel's table for one level, or 0 (each element exactly) where
    the table would have more nodes than ``numel / TABLE_ELEMENTS_PER_NODE`` (small tensors, tiny tau)."""
    if not tau > 0 or not math.isfinite(tau):
        return 0.0
    h = tau / TABLE_NODES_PER_TAU
    nodes = (level.qmax - level.qmin + 1 + 2 * CLAMP_TAUS * tau) / h + 2
    if nodes > TABLE_MAX_NODES or nodes * TABLE_ELEMENTS_PER_NODE > numel:
        return 0.0
    return h


# ---------------------------------------------------------------- the compiled kernel
# the compiled CPU op module (srq_cpu.cpp), built once (cached by source hash); None where it cannot be
kernel, kernel_available = plugin_kernel(Path(__file__).with_name("srq_cpu.cpp"), __name__)


def _use_kernel(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and mode() in ("auto", "cpu") and kernel_available()


# ---------------------------------------------------------------- the PyTorch path
def _window_grads(u: Tensor, tau: float, qmin: int, qmax: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(c, dE/du, dE/dtau)`` for a 1-D ``u`` on one integer grid, over the window only."""
    c = torch.clamp(torch.round(u), qmin, qmax)
    umin, umax = qmin - 0.5 - CLAMP_TAUS * tau, qmax + 0.5 + CLAMP_TAUS * tau
    clamped = (u < umin) | (u > umax)
    uc = u.clamp(umin, umax)
    offsets = range(max(-k, qmin - qmax), min(k, qmax - qmin) + 1)

    def code(o):
        kk = c + o
        valid = (kk >= qmin) & (kk <= qmax)
        t_hi, t_lo = (kk + 0.5 - uc) / tau, (kk - 0.5 - uc) / tau
        w = torch.where(valid, torch.sigmoid(t_hi) * torch.sigmoid(-t_lo), torch.zeros_like(uc))
        return w, t_hi, t_lo

    z, s = torch.zeros_like(uc), torch.zeros_like(uc)
    for o in offsets:
        w = code(o)[0]
        z += w
        s += o * w
    eo = s / z
    a, b = torch.zeros_like(uc), torch.zeros_like(uc)
    for o in offsets:
        w, t_hi, t_lo = code(o)
        d = torch.where(w > 0, (o - eo) * w, torch.zeros_like(w))
        f_lo, g_hi = torch.sigmoid(t_lo), torch.sigmoid(-t_hi)
        a += d * (f_lo - g_hi)
        b += d * torch.nan_to_num(f_lo * t_lo - g_hi * t_hi)
    dedu = torch.where(clamped, torch.zeros_like(a), a / (z * tau))
    return c, dedu, b / (z * tau)


def _grid_values(x: Tensor, steps: Tensor, levels: Sequence[Level], index: Tensor | None) -> Tensor:
    if index is None:
        lv, s = levels[0], steps[0]
        return s * (torch.clamp(torch.round(x / s - lv.offset), lv.qmin, lv.qmax) + lv.offset)
    y = torch.zeros_like(x)
    for i, lv in enumerate(levels):
        sel = index == i
        s = steps[i]
        y = torch.where(sel, s * (torch.clamp(torch.round(x / s - lv.offset), lv.qmin, lv.qmax) + lv.offset), y)
    return y


def _torch_backward(x, g, index, steps, taus, tau0s, levels, halfwidths, soft):
    gx = torch.zeros_like(x)
    galpha = x.new_zeros((), dtype=torch.float64)
    gsigma = x.new_zeros((), dtype=torch.float64)
    xf, gf = x.reshape(-1), g.reshape(-1)
    flat_index = None if index is None else index.reshape(-1)
    for i, lv in enumerate(levels):
        sel = None if flat_index is None else (flat_index == i).nonzero().squeeze(1)
        if sel is not None and sel.numel() == 0:
            continue
        xs, gs = (xf, gf) if sel is None else (xf[sel], gf[sel])
        u = xs / steps[i] - lv.offset
        c, dedu, dedtau = _window_grads(u, float(taus[i]), lv.qmin, lv.qmax, halfwidths[i])
        gxs = gs * dedu
        if sel is None:
            gx = gxs.reshape(x.shape)
        else:
            gx.view(-1)[sel] = gxs
        galpha += (lv.mult * gs.double() * ((c + lv.offset) - (u + lv.offset) * dedu - float(tau0s[i]) * dedtau).double()).sum()
        gsigma += (gs.double() * dedtau.double()).sum()
    gsoft = None
    if soft is not None:
        lo, hi = soft
        gsoft = (g.double() * (_grid_values(x, steps[hi:hi + 1], levels[hi:hi + 1], None)
                               - _grid_values(x, steps[lo:lo + 1], levels[lo:lo + 1], None)).double()).sum()
    return gx, galpha, gsigma, gsoft


# ---------------------------------------------------------------- a learned width's draws
_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons' 32-bit integer hash) on int64 values in ``[0, 2^32)``: every product
    stays below ``2^63`` (both multipliers are below ``2^31``)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def random_widths_reference(n: int, seeds: tuple[int, int], f: float, lo: int, device=None) -> Tensor:
    """:func:`random_widths` in PyTorch (int64 passes: any device)."""
    e = torch.arange(n, dtype=torch.int64, device=device) & _M32
    h = _mix32(_mix32((e + seeds[0]) & _M32) ^ seeds[1])
    u = (h >> 8).to(torch.float32) * 2.0 ** -24  # the top 24 bits: exact in float32, in [0, 1)
    return (u < torch.tensor(f, dtype=torch.float32, device=device)).to(torch.uint8) + lo


def random_widths(shape, f: float, lo: int, generator: torch.Generator, device) -> Tensor:
    """Each element's width for one step of a learned width: ``lo + 1`` where ``u_e < f`` (``f`` a float32
    value), else ``lo``; uint8 of ``shape``. A counter-based draw: ``u_e`` is the top 24 bits of
    ``hash(e, seeds)`` over ``2^24`` (``hash``: :func:`_mix32` twice around the seeds; ``torch.rand``'s
    float32 has the same 24 bits), so ``P(lo + 1) = ceil(f 2^24) / 2^24``. The two 32-bit seeds are
    drawn from ``generator``, so the draws follow its seed as ``torch.rand`` would, in one pass and
    without a Mersenne Twister step per element. The compiled ``random_widths`` (CPU) and
    :func:`random_widths_reference` give the same draws."""
    n = math.prod(shape)
    seeds = tuple(int(v) for v in torch.randint(0, 2 ** 32, (2,), generator=generator, device=device,
                                                dtype=torch.int64).tolist())
    f = float(torch.tensor(f, dtype=torch.float32))
    if _use_kernel(device):
        return kernel().random_widths(n, seeds[0], seeds[1], f, lo).reshape(shape)
    return random_widths_reference(n, seeds, f, lo, device).reshape(shape)


# ---------------------------------------------------------------- the two directions as custom ops
# torch.compile keeps each whole in the graph: the window half widths and table spacings are Python numbers read
# from tau (a tensor), which a traced function cannot do (.tolist() is a graph break); inside an op it is allowed.
def _levels_of(mults, offsets, qmins, qmaxs) -> list[Level]:
    return [Level(m, lo, hi, o) for m, o, lo, hi in zip(mults, offsets, qmins, qmaxs)]


def _halfwidths(taus: Tensor, levels: Sequence[Level]) -> list[int]:
    return [window_half_width(float(t), lv.qmax - lv.qmin + 1) for t, lv in zip(taus.tolist(), levels)]


@torch.library.custom_op("sqdist_srq::grid_forward", mutates_args=())
def grid_forward(x: Tensor, index: Optional[Tensor], steps: Tensor, taus: Tensor, tau0s: Tensor, mults: list[float],
                 offsets: list[float], qmins: list[int], qmaxs: list[int], use_kernel: bool) -> Tensor:
    """:class:`SRQFunction`'s forward: the compiled op (``use_kernel``) or :func:`_grid_values`."""
    levels = _levels_of(mults, offsets, qmins, qmaxs)
    if use_kernel:
        return kernel().forward(x, index, steps, taus, tau0s, mults, offsets, qmins, qmaxs, _halfwidths(taus, levels))
    return _grid_values(x, steps.to(x.device), levels, index)


@grid_forward.register_fake
def _(x, index, steps, taus, tau0s, mults, offsets, qmins, qmaxs, use_kernel):
    return x.new_empty(x.shape)


@torch.library.custom_op("sqdist_srq::grid_backward", mutates_args=())
def grid_backward(x: Tensor, index: Optional[Tensor], grad: Tensor, steps: Tensor, taus: Tensor, tau0s: Tensor,
                  mults: list[float], offsets: list[float], qmins: list[int], qmaxs: list[int],
                  soft: Optional[Tensor], use_kernel: bool) -> tuple[Tensor, Tensor]:
    """:class:`SRQFunction`'s backward: ``(grad x, [grad alpha, grad sigma, grad soft])`` (float64 (3,), on the
    CPU; grad soft 0 without ``soft``, the two levels ``(lo, hi)`` of a learned width: a tensor, read here and not
    in the traced forward), by the compiled op (``use_kernel``) or :func:`_torch_backward`."""
    soft_lo, soft_hi = (-1, -1) if soft is None else (int(v) for v in soft.tolist())
    levels = _levels_of(mults, offsets, qmins, qmaxs)
    halfwidths = _halfwidths(taus, levels)
    if use_kernel:
        return kernel().backward(x, index, grad, steps, taus, tau0s, mults, offsets, qmins, qmaxs, halfwidths,
                                 soft_lo, soft_hi, [table_spacing(float(t), lv, x.numel())
                                                    for t, lv in zip(taus.tolist(), levels)])
    dev = x.device
    soft = (soft_lo, soft_hi) if soft_lo >= 0 else None
    gx, galpha, gsigma, gsoft = _torch_backward(x, grad, index, steps.to(dev), taus.to(dev), tau0s.to(dev), levels,
                                                halfwidths, soft)
    gsoft = galpha.new_zeros(()) if gsoft is None else gsoft
    return gx, torch.stack([galpha, gsigma, gsoft.to(galpha.dtype)]).cpu()


@grid_backward.register_fake
def _(x, index, grad, steps, taus, tau0s, mults, offsets, qmins, qmaxs, soft, use_kernel):
    return x.new_empty(x.shape), x.new_empty((3,), dtype=torch.float64, device="cpu")


# ---------------------------------------------------------------- the autograd function
class SRQFunction(torch.autograd.Function):
    """``y = step_l (c + offset_l)``, ``c`` the mode, each element on its level; gradients as SRQ's
    estimator ``step (c + E - stopgrad E)`` of the full-grid reference, for ``x``, ``alpha``,
    ``sigma`` and ``f`` (the learned width's fraction: ``d/df`` of ``(1 - f) y_lo + f y_hi``).
    Both directions are custom ops (:func:`grid_forward`, :func:`grid_backward`)."""

    @staticmethod
    def forward(ctx, x, alpha, sigma, f, index, levels, soft):
        dtype = torch.promote_types(x.dtype, torch.float32)
        xf = x.detach().to(dtype)
        mults = torch.tensor([lv.mult for lv in levels], dtype=dtype, device=alpha.device)
        steps = alpha.detach().to(dtype).reshape(1) * mults
        tau0s = sigma.detach().to(dtype).abs().reshape(1) / steps
        taus = tau0s + TAU_FLOOR
        use_kernel = _use_kernel(xf.device) and dtype in (torch.float32, torch.float64)
        lists = ([lv.mult for lv in levels], [lv.offset for lv in levels], [lv.qmin for lv in levels],
                 [lv.qmax for lv in levels])
        y = grid_forward(xf, index, steps, taus, tau0s, *lists, use_kernel)
        ctx.save_for_backward(xf, index if index is not None else torch.empty(0), sigma, steps, taus, tau0s,
                              soft if soft is not None else torch.empty(0))
        ctx.info = (lists, soft is not None, use_kernel, index is not None, x.dtype, alpha.shape, alpha.dtype,
                    alpha.device)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xf, index, sigma, steps, taus, tau0s, soft = ctx.saved_tensors
        lists, has_soft, use_kernel, has_index, xdtype, ashape, adtype, adevice = ctx.info
        index = index if has_index else None
        g = grad.to(xf.dtype)
        gx, sums = grid_backward(xf, index, g, steps, taus, tau0s, *lists, soft if has_soft else None, use_kernel)
        galpha, gsigma, gsoft = sums[0], sums[1], sums[2]
        sign = torch.sign(sigma.detach())
        ga = (galpha.to(adtype) * torch.ones(ashape, dtype=adtype, device=galpha.device)).to(adevice)
        gs = (gsigma.to(sigma.dtype) * sign).to(sigma.device)
        gf = None if not has_soft or ctx.needs_input_grad[3] is False else gsoft.to(adtype).reshape(1)
        return gx.to(xdtype), ga, gs, gf, None, None, None


def srq_grid(x: Tensor, alpha: Tensor, sigma: Tensor, levels: Sequence[Level], index: Tensor | None = None,
             f: Tensor | None = None, soft: Tensor | tuple[int, int] | None = None) -> Tensor:
    """SRQ's straight-through output of ``x`` (any shape), each element on ``levels[index[e]]``
    (``index``: uint8 of ``x``'s shape, or None: all on ``levels[0]``). ``alpha``, ``sigma``: ``(1,)``.
    With ``f`` and ``soft = (lo, hi)`` (two integer levels) the output also carries the gradient of
    ``(1 - f) y_lo + f y_hi`` with the values held fixed, to ``f`` (``soft``: a tuple or an int64 ``(2,)``)."""
    if index is not None:
        index = index.to(torch.uint8)
    if soft is not None and not isinstance(soft, Tensor):
        soft = torch.tensor(soft, dtype=torch.int64)
    return SRQFunction.apply(x, alpha, sigma, f, index, tuple(levels), soft)
