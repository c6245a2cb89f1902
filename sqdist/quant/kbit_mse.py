"""k-bit's ``mse`` scale: per row, the ratio of ``max |w_i| / L`` with the least squared error.

:func:`kbit_mse_reference` searches it on every call; :func:`kbit_mse_ratio` is that search and
:func:`kbit_codes_at_ratio` (:func:`kbit_values_at_ratio`) the quantization at a given ratio, so ``KBit(scale="mse")`` can search
every few steps and reuse each row's ratio in between (:class:`sqdist.quant.weights.KBit`).
"""
from __future__ import annotations

import torch
from torch import Tensor


MSE_GRID = (32, 16)  # kbit scale="mse": coarse candidates in (0, 1] x max-scale, then finer ones around the best


def kbit_mse_reference(w: Tensor, bits: int = 4, grid: tuple[int, int] = MSE_GRID) -> tuple[Tensor, Tensor]:
    """Symmetric uniform k-bit whose per-row scale minimizes ``||w_i - Q_i||_2``, by a short search.

    ``w`` (m, n) -> (``codes`` (m, n), ``scale`` (m,)). Candidates are ``a * max|w_i| / L``:
    first ``a = 1/G, 2/G, ..., 1`` (``G = grid[0]``), then ``grid[1] + 1`` values spaced
    ``1/(G * grid[1])`` around each row's best. ``a = 1`` (:func:`kbit_reference`'s scale)
    is a candidate, so the L2 error is never above the max scale's.
    """
    return kbit_codes_at_ratio(w, kbit_mse_ratio(w, bits, grid), bits)


def kbit_mse_ratio(w: Tensor, bits: int = 4, grid: tuple[int, int] = MSE_GRID) -> Tensor:
    """The search of :func:`kbit_mse_reference`: per row the best ``a`` (scale over ``max|w_i| / L``), (m,) float32."""
    levels = 2 ** (bits - 1) - 1
    top = w.abs().amax(dim=1) / levels
    safe = torch.where(top > 0, top, torch.ones_like(top)).float()
    wf = w.float()
    coarse, fine = grid
    a = torch.arange(1, coarse + 1, dtype=torch.float32, device=w.device).div(coarse).expand(w.shape[0], -1)
    best = _best_ratio(wf, safe, a, levels)
    steps = torch.arange(-(fine // 2), fine // 2 + 1, dtype=torch.float32, device=w.device) / (coarse * fine)
    a = (best[:, None] + steps).clamp(1.0 / (coarse * fine), 1.0)
    a = torch.cat([best[:, None], a], dim=1)  # the coarse winner first: ties keep it
    return _best_ratio(wf, safe, a, levels)


def kbit_codes_at_ratio(w: Tensor, ratio: Tensor, bits: int = 4, values: bool = False) -> tuple[Tensor, Tensor]:
    """k-bit codes and scales of ``w`` (m, n) at ``scale_i = ratio_i * max|w_i| / L`` (``ratio`` (m,)); a zero row
    gets scale 0. With the ratio of :func:`kbit_mse_ratio` this is :func:`kbit_mse_reference`. ``values``:
    ``codes * scale[:, None]`` (the quantized weight) instead of the codes. On the CPU (float32) the compiled
    ``kbit_codes_at_ratio`` (on CUDA its Triton kernel; one pass a row, the products written there), else :func:`kbit_codes_at_ratio_reference`."""
    from .kernels import fast_op

    levels = 2 ** (bits - 1) - 1
    op = fast_op("kbit_codes_at_ratio", w) if w.dim() == 2 else None
    if op is None:
        codes, scale = kbit_codes_at_ratio_reference(w, ratio, bits)
        return (codes * scale[:, None] if values else codes), scale
    out, scale = op(w.detach(), ratio, levels, values)
    if w.requires_grad and torch.is_grad_enabled():  # the scale as the reference computes it, with its gradient
        scale = _row_scales(w, ratio, levels)[1].to(w.dtype)
    return out, scale


def kbit_values_at_ratio(w: Tensor, ratio: Tensor, bits: int = 4) -> tuple[Tensor, Tensor]:
    """``(codes * scale[:, None], scale)`` of :func:`kbit_codes_at_ratio`, no gradient."""
    with torch.no_grad():
        return kbit_codes_at_ratio(w, ratio, bits, values=True)


def _row_scales(w: Tensor, ratio: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """``(divisor, scale)`` per row at ``ratio``: ``ratio * max|w_i| / L``, except on a zero row, where the
    codes divide by ``ratio`` (they are 0 whatever it is) and the scale is 0."""
    top = w.abs().amax(dim=1) / levels
    divisor = torch.where(top > 0, top, torch.ones_like(top)).float() * ratio
    return divisor, torch.where(top > 0, divisor, torch.zeros_like(divisor))


def kbit_codes_at_ratio_reference(w: Tensor, ratio: Tensor, bits: int = 4) -> tuple[Tensor, Tensor]:
    """:func:`kbit_codes_at_ratio` in PyTorch."""
    levels = 2 ** (bits - 1) - 1
    divisor, scale = _row_scales(w, ratio, levels)
    codes = torch.clamp(torch.round(w.float() / divisor[:, None]), -levels, levels)
    return codes.to(w.dtype), scale.to(w.dtype)


def _best_ratio(w: Tensor, safe: Tensor, ratios: Tensor, levels: int) -> Tensor:
    """Per row, the ratio ``ratios[i, j]`` whose scale ``safe_i * ratios[i, j]`` has the least
    squared error (the first one on a tie); ``w`` (m, n), ``ratios`` (m, k) -> (m,). On the CPU the
    compiled ``mse_errors`` (on CUDA its Triton kernel; every candidate of a row in one pass over it) when it is available,
    else :func:`_best_ratio_reference`."""
    from .kernels import fast_op

    op = fast_op("mse_errors", w)
    if op is None:
        return _best_ratio_reference(w, safe, ratios, levels)
    return ratios.gather(1, op(w, safe, ratios, levels).argmin(dim=1)[:, None]).squeeze(1)


def _best_ratio_reference(w: Tensor, safe: Tensor, ratios: Tensor, levels: int) -> Tensor:
    """:func:`_best_ratio` in PyTorch: a pass over ``w`` per candidate (chunks of ~4 MB temporaries)."""
    m, k = ratios.shape
    chunk = max(1, (1 << 20) // max(w.numel(), 1))  # candidates at once: temporaries of ~4 MB
    errors = []
    for j in range(0, k, chunk):
        s = (safe[:, None] * ratios[:, j:j + chunk]).T[:, :, None]  # (c, m, 1)
        q = torch.div(w, s).round_().clamp_(-levels, levels).mul_(s).sub_(w)  # Q - w, (c, m, n)
        errors.append(q.square_().sum(dim=2).T)  # (m, c)
    best = torch.cat(errors, dim=1).argmin(dim=1)  # argmin returns the first minimum
    return ratios.gather(1, best[:, None]).squeeze(1)
