"""GPTQ (Frantar et al., *GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers*, ICLR 2023) and round-to-nearest, for one weight matrix on a fixed per-row grid.

The grid of a row (its scale, and TWN's threshold) is fixed from the *original* weights by the
registered quantizer itself (:func:`row_grid`); GPTQ then quantizes the columns one by one to
that grid, each column's rounding error spread over the columns not yet quantized through the
Cholesky factor of the damped inverse Hessian ``H = 2 X^T X``. So:

- the file holds exactly the quantizer's format (codes in its range, its per-row scale);
- with ``H`` a multiple of the identity nothing is spread and GPTQ gives round-to-nearest's
  codes (what the quantizer applied once gives): the difference between the two methods is
  the error compensation and nothing else;
- TWN keeps its own rule on the compensated weights: ``sign(w)`` where ``|w| > t_i``, else 0,
  with ``t_i`` and ``a_i`` from the original row (not nearest-of-``{-a, 0, a}``, whose
  threshold would be ``a_i / 2``); BWN: ``sign(w)`` times the original ``mean |W_i|``;
  k-bit: ``clamp(round(w / s_i), -L, L)`` with the quantizer's scale (``mse`` or ``max``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..quant.weights import twn_threshold
from .adaround import AdaRoundConfig, adaround_codes

METHODS = ("gptq", "rtn", "adaround")


@dataclass
class RowGrid:
    """The per-row grid of one layer: ``codes(w, rows)`` rounds a column ``w`` (r,) of the rows
    ``rows`` to integer codes; the value is ``scale[rows] * codes``."""

    kind: str            # kbit | twn | bwn
    scale: Tensor        # (m,) the quantizer's per-row scale of the original weights
    threshold: Tensor    # (m,) TWN's t_i (unused otherwise)
    levels: int          # k-bit's L (codes in [-L, L]); 1 for TWN/BWN

    def codes(self, w: Tensor, rows: slice | Tensor = slice(None)) -> Tensor:
        if self.kind == "bwn":
            return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        if self.kind == "twn":
            return torch.sign(w) * (w.abs() > self.threshold[rows].to(w.dtype))
        s = self.scale[rows].to(w.dtype)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        return torch.clamp(torch.round(w / safe), -self.levels, self.levels)

    def value(self, w: Tensor, rows: slice | Tensor = slice(None)) -> Tensor:
        return self.codes(w, rows) * self.scale[rows].to(w.dtype)


def row_grid(quantizer, w: Tensor) -> RowGrid:
    """The grid ``quantizer`` (a registered ``kbit``, ``twn`` or ``bwn``) puts on ``w`` (m, n)."""
    name = quantizer.quantizer_name
    _, scale = quantizer.quantize_codes(w)
    if name == "kbit":
        return RowGrid("kbit", scale, torch.zeros_like(scale), quantizer.levels)
    if name == "twn":
        t = twn_threshold(w, quantizer.delta, quantizer.threshold).reshape(-1)
        return RowGrid("twn", scale, t, 1)
    if name == "bwn":
        return RowGrid("bwn", scale, torch.zeros_like(scale), 1)
    raise ValueError(f"quantizer {name!r} has no fixed per-row grid; allowed: kbit, twn, bwn")


def damped_inverse_factor(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U``), (n, n).

    An all-zero ``H`` (a layer that saw only zero inputs) becomes the identity.
    """
    h = hessian.clone()
    diag = torch.diagonal(h)
    mean = diag.mean()
    if not bool(mean > 0):
        return torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    diag.add_(damp * mean)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)


def gptq_quantize(w: Tensor, hessian: Tensor, grid: RowGrid, *, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, rows: slice | Tensor = slice(None)) -> Tensor:
    """GPTQ codes of ``w`` (r, n) under ``hessian`` (n, n) on ``grid``'s rows ``rows``.

    Columns are quantized left to right (``act_order``: by decreasing ``diag H``); the error
    of column ``j``, divided by ``U[j, j]``, is subtracted from the later columns weighted by
    row ``j`` of ``U`` (:func:`damped_inverse_factor`): within a block of ``block`` columns at
    once per column, for the columns after the block in one matrix product per block.
    Returns integer-valued codes (r, n) in ``w``'s column order (float64).
    """
    w = w.detach().double().clone()
    h = hessian.detach().double()
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u = damped_inverse_factor(h, damp)
    n = w.shape[1]
    codes = torch.zeros_like(w)
    scale = grid.scale[rows].double()[:, None]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        wb = w[:, i1:i2].clone()
        errors = torch.zeros_like(wb)
        ub = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = wb[:, j]
            c = grid.codes(col, rows)
            codes[:, i1 + j] = c
            err = (col - c * scale[:, 0]) / ub[j, j]
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            errors[:, j] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes


def quantize_weight(weight: Tensor, grams: Tensor, quantizer, method: str, *, damp: float = 0.01,
                    block: int = 128, act_order: bool = False, rows: float = 1.0,
                    adaround: AdaRoundConfig = AdaRoundConfig()) -> tuple[Tensor, Tensor]:
    """Codes and per-row scale of a Conv/Linear ``weight`` (C_out, ...) by ``method``.

    ``grams``: (groups, D_g, D_g) ``X_g^T X_g`` of the layer's unfolded inputs per conv group
    (1 for a Linear; ``sqdist.compress.layers.input_statistics``); ``weight`` is seen as
    (C_out, C_in/groups * kh * kw) and the rows of group ``g`` use ``grams[g]``, so a grouped or
    depthwise conv is quantized group by group. ``rtn``: ``quantizer.quantize_codes`` once.
    ``adaround``: :func:`sqdist.ptq.adaround.adaround_codes` on the same grid (k-bit, TWN), its
    error normalised by ``rows`` (the input rows the Gram matrices sum over).
    Returns (``codes`` (C_out, D_g) in the weight's dtype, ``scale`` (C_out,)).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    w = weight.detach().reshape(weight.shape[0], -1)
    if method == "rtn":
        return quantizer.quantize_codes(w)
    grid = row_grid(quantizer, w)
    if method == "adaround" and grid.kind == "bwn":
        raise ValueError("method='adaround' with quantizer 'bwn' (no zero code to round to); allowed: kbit, twn")
    groups = grams.shape[0]
    per = w.shape[0] // groups
    codes = torch.empty_like(w)
    for g in range(groups):
        part = slice(g * per, (g + 1) * per)
        if method == "adaround":
            c, _ = adaround_codes(w[part], grams[g], grid.scale[part], grid.levels, rows, adaround)
            codes[part] = c.to(w.dtype)
            continue
        # 2 X^T X: the factor cancels in the update, kept so H is the paper's
        codes[part] = gptq_quantize(w[part], 2 * grams[g], grid, damp=damp, block=block, act_order=act_order,
                                    rows=part).to(w.dtype)
    return codes, grid.scale.to(w.dtype)
