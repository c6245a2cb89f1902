"""LSQ fake quantization (Esser et al., ICLR 2020), shared by the activation quantizer and
k-bit's learned step: the straight-through reference and the one-node op training uses; and the
straight-through weight every quantizer without learned state trains with (:func:`straight_through`)."""
from __future__ import annotations

import torch
from torch import Tensor


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, q):
        return q

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(w: Tensor, q: Tensor) -> Tensor:
    """``q`` forward, the gradient unchanged to ``w`` backward: the value and gradient of
    ``q + (w - w.detach())`` for a ``q`` computed without gradient, without that form's two passes and
    temporary. Where the two differ: ``q`` gets no gradient (it must not need one); a ``-0.0`` of
    ``q`` stays ``-0.0`` (the sum made it ``+0.0``); an infinite or NaN weight leaves ``q`` as it is
    (the sum gave NaN); and the output is a view of ``q`` made by a custom function, so writing into
    it in place raises (a layer only reads it)."""
    return _StraightThrough.apply(w, q)


def round_pass(x: Tensor) -> Tensor:
    """``round(x)`` whose gradient is 1 (LSQ's ``roundpass``, a straight-through round)."""
    return (torch.round(x) - x).detach() + x


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """``x`` whose gradient is multiplied by ``factor`` (LSQ's ``gradscale``)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


def lsq_quantize(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_factor: float) -> Tensor:
    """LSQ fake quantization (Esser et al., ICLR 2020): ``round(clip(x / s, qmin, qmax)) * s``.

    ``x`` any shape, ``step`` the step size ``s`` as used (shape (1,); a method that derives it
    from its parameter, e.g. ``|p|``, passes the derived tensor and autograd carries on). Gradients
    are the paper's: ``d/dx = 1`` where ``qmin < x/s < qmax`` and 0 outside; ``d/ds = round(x/s) - x/s``
    inside, ``qmin`` / ``qmax`` outside, times ``grad_factor`` (the paper's ``g = 1/sqrt(N * Q_P)``).
    One autograd node with a hand-written backward (:class:`_LSQQuantize`);
    :func:`lsq_quantize_reference` is the same rule spelled with straight-through ops.
    """
    return _LSQQuantize.apply(x, step, qmin, qmax, grad_factor)


def lsq_quantize_reference(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_factor: float) -> Tensor:
    """:func:`lsq_quantize` by autograd through straight-through ops (the paper's pseudo-code)."""
    s = grad_scale(step, grad_factor)
    v = x / s
    inside = (v > qmin) & (v < qmax)
    v = torch.where(inside, v, v.detach().clamp(qmin, qmax))  # outside: the constant bound
    return round_pass(v) * s


class _LSQQuantize(torch.autograd.Function):
    """LSQ's forward and both gradients with few passes over ``x`` and no saved temporaries: only
    ``x`` and ``s`` are kept (the layer before usually keeps ``x`` already); the backward recomputes
    ``x / s`` and yields ``grad_x`` and ``grad_s`` together. On the CPU (float32) the compiled ops
    do each direction in one pass (the Triton kernels on CUDA); the PyTorch form below is their reference."""

    @staticmethod
    def forward(ctx, x, step, qmin, qmax, grad_factor):
        from .kernels import fast_op  # lsq_forward / lsq_backward: one pass each (C++ on the CPU, Triton on CUDA)

        ctx.save_for_backward(x, step)
        ctx.qmin, ctx.qmax, ctx.grad_factor = qmin, qmax, grad_factor
        op = fast_op("lsq_forward", x) if step.numel() == 1 else None
        ctx.compiled_backward = fast_op("lsq_backward", x) if op is not None else None
        if op is not None:
            return op(x, step, qmin, qmax)
        return torch.div(x, step).clamp_(qmin, qmax).round_().mul_(step)

    @staticmethod
    def backward(ctx, grad):
        x, step = ctx.saved_tensors
        if ctx.compiled_backward is not None and grad.dtype == torch.float32:
            grad_x, total = ctx.compiled_backward(x, grad, step, ctx.qmin, ctx.qmax)
            grad_step = total.mul_(ctx.grad_factor).reshape(step.shape).to(step.dtype) if ctx.needs_input_grad[1] else None
            return (grad_x if ctx.needs_input_grad[0] else None), grad_step, None, None, None
        v = torch.div(x, step)
        outside = torch.le(v, ctx.qmin).logical_or_(v >= ctx.qmax)
        grad_x = grad_step = None
        if ctx.needs_input_grad[1]:
            # d/ds: round(v) - v inside, the bound outside; = round(clamp(v)) - (v, 0 outside)
            term = v.clamp(ctx.qmin, ctx.qmax).round_().sub_(v.masked_fill_(outside, 0))
            grad_step = (grad * term).sum().mul_(ctx.grad_factor).reshape(step.shape).to(step.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad.masked_fill(outside, 0).to(x.dtype)
        return grad_x, grad_step, None, None, None
