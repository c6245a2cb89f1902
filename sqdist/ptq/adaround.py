"""AdaRound (Nagel et al., *Up or Down? Adaptive Rounding for Post-Training Quantization*,
ICML 2020) for one weight matrix on the quantizer's fixed per-row grid.

Each weight is rounded down or up, ``w~ = s * clip(floor(w / s) + h(V), -L, L)``, with the
rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (zeta = 1.1,
gamma = -0.1) learned by Adam against the layer's output error plus the rounding regulariser
``lambda * sum(1 - |2 h(V) - 1|^beta)``, ``beta`` annealed from 20 to 2 after a warm-up without
it (the paper's schedule: 20% warm-up, lambda = 0.01). The output error is the Hessian form of
the paper's ``||W X - W~ X||^2`` (mean over output elements): ``trace(dW H dW^T) / (rows * m)``
per conv group, ``H`` the (centred where the walk centres it) Gram matrix GPTQ uses, so no
activations need to be kept. ``V`` starts where ``h(V)`` is the fractional part of ``w / s``.
At the end the decision is ``h(V) >= 0.5``. The grid (k-bit's per-row scale; TWN's per-row
``a_i`` with codes in ``{-1, 0, 1}``) is the quantizer's, so the file and ``load_quantized``
are as for GPTQ and RTN. This loop is the reference; there is no other implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """iters: Adam steps per layer; reg: lambda; warmup: the share of steps without the
    regulariser; beta: (start, end) of its annealed exponent; lr: Adam's step size."""

    iters: int = 1000
    reg: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    lr: float = 1e-2


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V)`` in [0, 1]: exactly 0 or 1 once ``|V|`` is large enough."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def initial_logits(rest: Tensor) -> Tensor:
    """``V`` with ``h(V) = rest`` (the fractional part, in [0, 1))."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def beta_at(step: int, config: AdaRoundConfig) -> float | None:
    """The regulariser's exponent at ``step`` (None during the warm-up)."""
    start = int(config.warmup * config.iters)
    if step < start:
        return None
    t = (step - start) / max(1, config.iters - start)
    hi, lo = config.beta
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t))


def adaround_codes(w: Tensor, hessian: Tensor, scale: Tensor, levels: int, rows: float,
                   config: AdaRoundConfig = AdaRoundConfig()) -> tuple[Tensor, dict]:
    """Integer codes (m, n) of ``w`` (m, n) on the grid ``scale`` (m,) * ``[-levels, levels]``,
    learned against ``hessian`` (n, n) (``X^T X`` of the inputs, ``rows`` of them).

    Deterministic (``V`` starts from the weights). Returns (codes in float64,
    ``{"h": h(V) at the end, "loss": [reconstruction per step]}``).
    """
    w = w.detach().double()
    h = hessian.detach().double()
    s = torch.where(scale > 0, scale, torch.ones_like(scale)).double()[:, None]
    x = w / s
    floor = torch.floor(x)
    v = initial_logits(x - floor).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=config.lr)
    norm = max(rows, 1.0) * w.shape[0]
    history = []
    with torch.enable_grad():   # the walk runs under no_grad
        for step in range(config.iters):
            soft = s * torch.clamp(floor + rectified_sigmoid(v), -levels, levels)
            dw = w - soft
            recon = ((dw @ h) * dw).sum() / norm
            loss = recon
            beta = beta_at(step, config)
            if beta is not None:
                loss = loss + config.reg * (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(recon.detach()))
    with torch.no_grad():
        final = rectified_sigmoid(v)
        codes = torch.clamp(floor + (final >= 0.5).double(), -levels, levels)
        codes = torch.where(scale[:, None] > 0, codes, torch.zeros_like(codes))
    return codes, {"h": final, "loss": history}
