"""SLB: Searching for Low-Bit Weights (Yang et al., NeurIPS 2020, arXiv 2009.08695).

Each weight chooses one of ``n = 2^b`` levels ``v`` (``linspace(-1, 1, n)``: ``{-1, +1}`` for
b = 1), and the choice is learned: the quantizer holds logits ``A`` of shape
``W.shape + (n,)``. Training uses the exact expectation ``W = sum_j softmax(T A)_j v_j``
(no straight-through estimator); the inverse temperature ``T`` grows during training so the
softmax turns into the argmax, which evaluation (and training after the annealing ends) uses.
There is no scale: the BatchNorm after the layer absorbs it. The reference followed is
MindSpore golden-stick (``mindspore_gs/quantization/slb/``); the README next to this package
lists the choices made here.

Memory: the logits are ``n`` times the weights (and so are their gradient, the optimizer's
state and the softmax kept for the backward): :meth:`SLB.calibrate` refuses a layer that
cannot fit, with one line.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from sqdist.plugin import Quantizer, QuantizerError, kernel_mode, plugin_kernel

BITS = (1, 2, 3, 4)
INITS = ("he", "weight", "normal")
# bytes per logit while training: the logit, its gradient, two Adam moments, the softmax kept for backward
TRAIN_COPIES = 5


def expectation_reference(logits: Tensor, levels: Tensor, t: float) -> Tensor:
    """``sum_j softmax(t A)_j v_j`` over the last dim of ``logits`` (..., n): the plain form, autograd's backward."""
    p = torch.softmax(t * logits, dim=-1)
    return (p * levels.to(p.dtype)).sum(dim=-1)


class _Expectation(torch.autograd.Function):
    """:func:`expectation_reference` with a hand-written backward, on the transposed logits.

    A softmax over a last dimension of 2-16 entries is slow on the CPU (one short row at a time):
    the logits (..., n) are read once into ``z = t A^T`` (n, M), the softmax runs over dim 0 (all M
    rows at once), and ``E = v^T p`` is one matrix-vector product. Only ``p`` (n, M) and ``E`` are
    kept; backward is ``dL/dA_j = t p_j (v_j - E) dL/dE`` in one buffer, updated in place, and
    written back to the logits' layout.
    """

    @staticmethod
    def forward(ctx, logits, levels, t):
        n = logits.shape[-1]
        z = torch.empty((n, logits.numel() // n), dtype=logits.dtype, device=logits.device)
        torch.mul(logits.reshape(-1, n).T, t, out=z)
        p = torch.softmax(z, dim=0)
        del z
        e = levels @ p
        ctx.save_for_backward(p, e, levels)
        ctx.t, ctx.shape = t, logits.shape
        return e.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        p, e, levels = ctx.saved_tensors
        out = levels[:, None] - e[None, :]
        out.mul_(p).mul_((grad.reshape(1, -1) * ctx.t))
        return out.T.contiguous().reshape(ctx.shape), None, None


class _Expectation1Bit(torch.autograd.Function):
    """1 bit (levels ``{-1, +1}``): ``E = p_1 - p_0 = tanh(t (A_1 - A_0) / 2)``, saved as ``E`` alone;
    ``dL/dA_1 = -dL/dA_0 = t / 2 (1 - E^2) dL/dE``."""

    @staticmethod
    def forward(ctx, logits, t):
        a0, a1 = logits.unbind(-1)
        e = torch.tanh((a1 - a0).mul_(0.5 * t))
        ctx.save_for_backward(e)
        ctx.t = t
        return e

    @staticmethod
    def backward(ctx, grad):
        (e,) = ctx.saved_tensors
        h = (1 - e * e).mul_(grad).mul_(0.5 * ctx.t)
        return torch.stack([-h, h], dim=-1), None


# the compiled CPU kernels (slb_cpu.cpp: expectation, argmax, confidence), built on first use; None where they
# cannot be
kernel, kernel_available = plugin_kernel(Path(__file__).with_name("slb_cpu.cpp"), __name__)


# The kernel's two directions as custom ops: torch.compile keeps them whole in the graph (a pybind11
# function would stop it), their fake kernels give the tracer the output shapes.
@torch.library.custom_op("sqdist_slb::expectation_forward", mutates_args=())
def expectation_forward(a: Tensor, levels: list[float], t: float) -> Tensor:
    """``E`` (M,) of the logits ``a`` (M, n) by the CPU kernel."""
    return kernel().forward(a, levels, t)


@expectation_forward.register_fake
def _(a, levels, t):
    return a.new_empty(a.shape[:1])


@torch.library.custom_op("sqdist_slb::expectation_backward", mutates_args=())
def expectation_backward(a: Tensor, levels: list[float], t: float, grad: Tensor) -> Tensor:
    """``dL/dA`` (M, n) from ``dL/dE`` (M,) by the CPU kernel."""
    return kernel().backward(a, levels, t, grad)


@expectation_backward.register_fake
def _(a, levels, t, grad):
    return a.new_empty(a.shape)


class _ExpectationKernel(torch.autograd.Function):
    """:func:`expectation_reference` by the CPU kernel, in the logits' own layout: one pass forward,
    one backward (``p`` recomputed from the logits, so only the logits are kept)."""

    @staticmethod
    def forward(ctx, logits, levels, t):
        n = logits.shape[-1]
        a = logits.reshape(-1, n)
        ctx.save_for_backward(a)
        ctx.levels, ctx.t, ctx.shape = levels, t, logits.shape
        return expectation_forward(a, list(levels), t).reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return expectation_backward(a, list(ctx.levels), ctx.t, grad.reshape(-1)).reshape(ctx.shape), None, None


@torch.library.custom_op("sqdist_slb::argmax_levels", mutates_args=())
def argmax_levels(a: Tensor, levels: list[float]) -> Tensor:
    """``v[argmax_j a_mj]`` (M,) of the logits ``a`` (M, n) by the CPU kernel (:func:`hard_levels_reference`)."""
    return kernel().argmax_levels(a, levels)


@argmax_levels.register_fake
def _(a, levels):
    return a.new_empty(a.shape[:1])


def hard_levels_reference(logits: Tensor, levels: Tensor) -> Tensor:
    """The hard phase: the level of each weight's largest logit, the logits kept in the graph at zero gradient."""
    return levels.to(logits.dtype)[logits.argmax(dim=-1)] + 0.0 * logits.sum()


def confidence_reference(logits: Tensor, t: float) -> Tensor:
    """The mean over the rows of ``max_j softmax(t A)_j`` (logits (M, n)), as ``1 / sum_j exp(t a_j - max_j t a_j)``."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) * t  # float64 stays float64
    return z.sub_(z.amax(dim=-1, keepdim=True)).exp_().sum(dim=-1).reciprocal_().mean()


class _HardLevelsKernel(torch.autograd.Function):
    """:func:`hard_levels_reference` by the CPU kernel: one pass over the logits, and their zero gradient
    written once (the reference reduces the logits to a sum and broadcasts its gradient back)."""

    @staticmethod
    def forward(ctx, logits, levels):
        n = logits.shape[-1]
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return argmax_levels(logits.reshape(-1, n), list(levels)).reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        # zero: the argmax has no gradient; the logits stay in the graph because DDP and ZeRO expect one
        return grad.new_zeros(ctx.shape, dtype=ctx.dtype), None


def _use_kernel(logits: Tensor) -> bool:
    m = kernel_mode("SQDIST_SLB_KERNEL")  # SQDIST_KERNELS; the old variable's torch is the reference
    if m not in ("auto", "cpu", "torch", "reference", "cuda", "triton"):
        raise ValueError(f"SQDIST_SLB_KERNEL={m!r}; allowed: auto, cpu, torch (deprecated: set SQDIST_KERNELS)")
    return (m in ("auto", "cpu") and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64)
            and logits.shape[-1] in (2, 4, 8, 16) and kernel_available())


def expectation(logits: Tensor, levels: Tensor, t: float, binary: bool = False,
                level_values: tuple[float, ...] | None = None) -> Tensor:
    """``sum_j softmax(t A)_j v_j`` (the fast path of :func:`expectation_reference`); ``binary``:
    the levels are ``(-1, +1)`` (1 bit), computed as a tanh. On the CPU the compiled kernel
    (``SQDIST_KERNELS=reference`` takes the PyTorch path, transposed logits). ``level_values``: ``levels``
    as Python floats, when the caller has them (a read of the tensor would stop ``torch.compile``'s graph)."""
    if binary:
        return _Expectation1Bit.apply(logits, float(t))
    if _use_kernel(logits):
        values = level_values if level_values is not None else tuple(float(v) for v in levels.tolist())
        return _ExpectationKernel.apply(logits, values, float(t))
    return _Expectation.apply(logits, levels.to(logits.dtype), float(t))


def he_std(shape: tuple[int, ...], n: int) -> float:
    """golden-stick's He-normal (fan_out, ReLU) over the logits ``shape + (n,)``: ``sqrt(2 / (C_out k^2 n))``."""
    fan_out = shape[0] * math.prod(shape[2:]) * n
    return math.sqrt(2.0 / fan_out)


def slb_levels(bits: int) -> Tensor:
    """The ``2^bits`` levels, ``linspace(-1, 1, 2^bits)`` (``{-1, +1}`` for 1 bit), shape (n,).

    Computed as ``codes * (1 / (n - 1))`` in float32, exactly what export's ``codes * scale`` gives.
    """
    n = 2 ** bits
    return torch.tensor(slb_code_levels(bits), dtype=torch.float32) * torch.tensor(1.0 / (n - 1))


def slb_code_levels(bits: int) -> list[int]:
    """Integer codes of the levels: ``v_j = code_j / (n - 1)``, odd integers ``-(n-1) .. n-1``."""
    n = 2 ** bits
    return [2 * j - (n - 1) for j in range(n)]


def temperature(step: int, total_steps: int, steps_per_epoch: int, t0: float = 1.0, t_start: float = 0.2,
                t_end: float = 0.6, factor: float = 1.2) -> tuple[float, bool]:
    """``(T, hard)`` for optimizer step ``step`` (0-based), golden-stick's ``TemperatureScheduler``.

    With ``E`` epochs, ``start = int(E t_start)``, ``end = int(E t_end)`` and ``e`` the 1-based
    epoch of the step: ``T = t0`` while ``e <= start``, then ``t0 factor^(min(e, end) - start)``;
    ``hard`` (argmax in training too) once ``e >= end``. A pure function of the step: a resumed
    run continues the schedule exactly.
    """
    steps_per_epoch = max(1, steps_per_epoch)
    epochs = max(1, math.ceil(total_steps / steps_per_epoch))
    epoch = step // steps_per_epoch + 1
    start, end = int(epochs * t_start), int(epochs * t_end)
    t = t0 * factor ** (min(epoch, end) - start) if epoch > start else t0
    return t, epoch >= end


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` (CUDA: ``mem_get_info``; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _number(name, value, low, high, low_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"slb {name}={value!r}; allowed: a number in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


class SLB(Quantizer):
    """SLB weights: learned logits ``A`` (``W.shape + (2^bits,)``) over the levels :func:`slb_levels`.

    Forward (training): ``W = sum_j softmax(T A)_j v_j``, ``v`` the levels; after the annealing
    (``hard``) and in eval: ``W = v[argmax_j A_j]``. Export: codes :func:`slb_code_levels`, scale
    ``1 / (n - 1)`` per row. The layer's own weight gives ``A`` its shape (and its start with
    ``init="weight"``, :meth:`calibrate`); it is frozen (``uses_weight = False``), and SQ ratios
    below 1 are refused.

    Args:
        bits: 1..4 (``2^bits`` logits per weight).
        t0, t_start, t_end, factor: the inverse temperature schedule (:func:`temperature`);
            golden-stick's defaults 1.0, 0.2, 0.6, 1.2 (the authors' README: factor 1.03-1.06,
            start 0.3-0.4, end 0.9).
        init: ``"he"`` (default, golden-stick's): He-normal logits (:func:`he_std`), every
            weight undecided (``softmax`` about uniform); ``"weight"``: logits from the layer's
            initial weight, each weight committed to its nearest level (:meth:`calibrate`);
            ``"normal"``: standard normal logits.
        fused: True (default): the expectation's hand-written backward (:func:`expectation`);
            False: the plain form (:func:`expectation_reference`), same values.
    """

    uses_weight = False

    def __init__(self, bits: int = 1, t0: float = 1.0, t_start: float = 0.2, t_end: float = 0.6,
                 factor: float = 1.2, init: str = "he", fused: bool = True):
        super().__init__()
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"slb bits={bits!r}; allowed: 1, 2, 3, 4")
        if init not in INITS:
            raise ValueError(f"slb init={init!r}; allowed: {', '.join(repr(i) for i in INITS)}")
        if not isinstance(fused, bool):
            raise ValueError(f"slb fused={fused!r}; allowed: true, false")
        self.bits, self.init, self.fused = bits, init, fused
        self.t0 = _number("t0", t0, 0.0, 1e6, low_open=True)
        self.t_start = _number("t_start", t_start, 0.0, 1.0)
        self.t_end = _number("t_end", t_end, 0.0, 1.0)
        if self.t_end < self.t_start:
            raise ValueError(f"slb t_end={t_end!r}; allowed: a number in [t_start={t_start!r}, 1]")
        self.factor = _number("factor", factor, 1.0, 1e3)
        self.register_buffer("levels", slb_levels(bits), persistent=False)  # (n,)
        self.level_values = tuple(float(v) for v in self.levels.tolist())  # the same, for the kernel
        self.logits = nn.Parameter(torch.zeros(0))  # W.shape + (n,), set by calibrate()
        self.temperature, self.hard = self.t0, False
        self._epochs: int | None = None

    # ------------------------------------------------------------ schedule (sqdist.train hooks)
    def set_progress(self, step: int, total_steps: int, steps_per_epoch: int) -> None:
        self.temperature, self.hard = temperature(step, total_steps, steps_per_epoch, self.t0, self.t_start,
                                                  self.t_end, self.factor)
        self._epochs = max(1, math.ceil(total_steps / max(1, steps_per_epoch)))

    def recalibrate_bn_after_epoch(self, epoch: int) -> bool:
        """After each epoch past ``t_start`` (golden-stick's BNCalibrationCallback): BN for the argmax net."""
        return self._epochs is not None and epoch + 1 > int(self._epochs * self.t_start)

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Temperature, hard phase, and the mean probability of the chosen level (1.0: fully decided)."""
        if self.logits.numel() == 0:
            return {}
        a = self.logits.detach().reshape(-1, self.logits.shape[-1])
        # one pass of the CPU kernel: 30 ms against 171 ms for the PyTorch form's passes over 52 M logits (about
        # resnet18 W2's 45 M; 2 threads); tests/test_slb.py holds it to confidence_reference
        confidence = kernel().confidence(a, float(self.temperature)) if _use_kernel(a) \
            else confidence_reference(a, self.temperature)
        return {"temperature": self.temperature, "hard": float(self.hard), "confidence": float(confidence)}

    # ------------------------------------------------------------ quantizer
    def calibrate(self, weight: Tensor) -> None:
        """Create the logits for the layer's weight ``W`` (any shape, dim 0 = rows).

        ``init="he"`` (golden-stick's): ``N(0, he_std^2)`` with ``fan_out = C_out k^2 2^bits``;
        logits that small leave ``softmax(T A)`` about uniform, so every weight starts undecided
        and the search starts from the expectation near 0. ``init="weight"``: each row is normalized, ``x = W_i / s_i`` clipped to [-1, 1] with
        ``s_i = mean |W_i|`` at 1 bit (BWN's scale) and ``max |W_i|`` above (the levels span the
        row), and ``A_j = -(x - v_j)^2 / (2 tau^2)`` with ``tau`` half the level spacing. So the
        argmax is the level nearest to ``x`` and, at ``T = 1``, the expectation follows ``x``
        smoothly (1 bit: ``tanh(x)``): each weight starts committed to the level of its
        initial value (confidence about 0.8 at 1 bit).
        Refuses (one line) a layer whose logits cannot be trained in the memory free on the
        weight's device (on the GPU where CUDA is available).
        """
        n = 2 ** self.bits
        device = weight.device
        target = torch.device("cuda", torch.cuda.current_device()) \
            if device.type == "cpu" and torch.cuda.is_available() else device
        need = TRAIN_COPIES * weight.numel() * n * 4
        free = free_bytes(target)
        if need > free:
            raise QuantizerError(
                f"slb bits={self.bits}: a layer of {weight.numel()} weights needs {n} logits per weight, "
                f"~{need / 2**30:.2f} GiB to train (logits, gradient, optimizer state, softmax), more than the "
                f"{free / 2**30:.2f} GiB free on {target}; allowed: fewer bits, or fewer quantized layers (quant.exclude)")
        w = weight.detach().float().reshape(weight.shape[0], -1)
        with torch.no_grad():
            if self.init == "he":
                logits = torch.randn(*w.shape, n, device=device) * he_std(tuple(weight.shape), n)
            elif self.init == "normal":
                logits = torch.randn(*w.shape, n, device=device)
            else:
                s = w.abs().mean(dim=1) if self.bits == 1 else w.abs().amax(dim=1)
                s = torch.where(s > 0, s, torch.ones_like(s))
                x = (w / s[:, None]).clamp(-1.0, 1.0)
                tau = 1.0 / (n - 1)
                logits = -(x[..., None] - self.levels.to(device)).square() / (2 * tau * tau)
        self.logits = nn.Parameter(logits.reshape(*weight.shape, n).to(weight.dtype))

    def _logits2d(self, rows: int) -> Tensor:
        if self.logits.numel() == 0:
            raise RuntimeError("slb: no logits; call calibrate(weight) first (quantize_model does)")
        return self.logits.reshape(rows, -1, self.logits.shape[-1])

    def quantize_codes(self, w):
        """Codes of the argmax levels (odd integers, :func:`slb_code_levels`), scale ``1 / (n - 1)``."""
        logits, n = self._logits2d(w.shape[0]), 2 ** self.bits
        if self.fused and _use_kernel(logits):  # the hard phase's kernel with the codes as its levels: exact integers
            codes = argmax_levels(logits.detach().reshape(-1, n), [float(2 * j - (n - 1)) for j in range(n)])
            codes = codes.reshape(logits.shape[:-1]).to(w.dtype)
        else:
            codes = (2 * logits.argmax(dim=-1) - (n - 1)).to(w.dtype)
        return codes, torch.full((w.shape[0],), 1.0 / (n - 1), dtype=w.dtype, device=w.device)

    def fake_quantize(self, w):
        """Training: the expectation under ``softmax(T A)``; after annealing (or in eval) the argmax,
        with the logits kept in the graph at zero gradient (DDP and ZeRO expect every parameter)."""
        logits = self._logits2d(w.shape[0])
        if self.hard or not self.training:
            if self.fused and _use_kernel(logits):
                return _HardLevelsKernel.apply(logits, self.level_values).to(w.dtype)
            return hard_levels_reference(logits, self.levels).to(w.dtype)
        if self.fused:
            return expectation(logits, self.levels, self.temperature, binary=self.bits == 1,
                               level_values=self.level_values).to(w.dtype)
        return expectation_reference(logits, self.levels, self.temperature).to(w.dtype)

    def code_levels(self) -> list[int]:
        return slb_code_levels(self.bits)

    def config(self):
        return {"bits": self.bits, "t0": self.t0, "t_start": self.t_start, "t_end": self.t_end,
                "factor": self.factor, "init": self.init, "fused": self.fused}
