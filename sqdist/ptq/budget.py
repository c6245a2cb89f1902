"""Bits per layer under a size budget: each layer's sensitivity per width, then a knapsack.

**What a width costs** is what the packed file stores for the layer (``sqdist.export``): its
codes, ``ceil(numel * bits / 8)`` bytes, and its per-row scales (``rows * 4`` bytes in float32),
:func:`layer_bytes`. ``--avg-bits B`` is a budget of ``B * (weights of the quantized layers)``
bits over those bytes (scales included, so uniform k-bit is slightly above ``k`` bits per weight);
``--size-budget BYTES`` is that byte count directly (the quantized layers' codes and scales: the
rest of the file, stem, classifier, BatchNorm, metadata, is the same whatever the widths).

**The widths**: 1 bit is BWN's grid (``sign(w)`` times the row's ``mean |w|``), 2-8 bits k-bit's
(mse scale; 2 bits is ternary). Each is rounded by the run's method (GPTQ or round-to-nearest;
AdaRound's sensitivities are measured with GPTQ, its 1000 steps per layer and width would cost
far more than the walk).

**Sensitivity** (:func:`sensitivities`): with only that layer quantized to that width (on the
inputs of the full-precision network), BatchNorm statistics re-estimated on the calibration
images as the pipeline re-estimates them at the end, the mean KL divergence
``KL(p_fp || p_q)`` of the network's predictions from the full-precision network's (its BN
statistics re-estimated the same way) on the calibration images: no labels, never negative,
and it costs two forwards of the calibration set per layer and width. The sensitivities are
summed over layers (the usual additive approximation; how well the choice does is measured in
``benchmarks/results/ptq_budget_*.md``).

**The choice** (:func:`choose_widths`): a multiple-choice knapsack, one width per layer,
minimising the summed sensitivity with the summed bytes within the budget, solved *exactly* by
dynamic programming over bytes (:func:`knapsack`; costs in units of ``ceil(budget / 20000)``
bytes, rounded up, so the choice never exceeds the budget). Why not a Lagrangian sweep
(``min sens + lambda * bytes`` per layer for a range of ``lambda``): it only reaches choices on
the lower convex hull of each layer's (bytes, sensitivity) points and can leave budget unused
or miss the optimum between two hull points; the DP costs ``layers * widths * units``
operations (a few million for resnet50), nothing next to the sensitivity forwards.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import Quantizer, create_quantizer

WIDTHS = (1, 2, 3, 4, 8)
MAX_UNITS = 20000
SCALE_BYTES = 4   # a float32 per-row scale


def width_quantizer(bits: int, kbit_params: Mapping | None = None) -> Quantizer:
    """The quantizer of a width: ``bwn`` at 1 bit, ``kbit`` (``kbit_params``, its ``bits`` replaced) above."""
    if bits == 1:
        return create_quantizer("bwn")
    return create_quantizer("kbit", **{**dict(kbit_params or {}), "bits": bits})


def layer_bytes(module: nn.Module, bits: int) -> int:
    """Bytes of ``module``'s codes and per-row scales in the packed file at ``bits``."""
    w = module.weight
    return math.ceil(w.numel() * bits / 8) + w.shape[0] * SCALE_BYTES


def knapsack(costs: list[list[int]], values: list[list[float]], budget: int) -> list[int] | None:
    """The choice of one option per item (index per item) with the smallest summed value and
    summed cost at most ``budget`` (non-negative integer costs), or None when none fits.

    Dynamic programming over the cost: ``best[c]`` is the smallest value of the items so far at
    total cost exactly ``c``; each item's options are tried against every ``c`` at once.
    """
    if budget < 0:
        return None
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(costs), budget + 1), dtype=np.int16)
    for i, (cs, vs) in enumerate(zip(costs, values)):
        new = np.full(budget + 1, np.inf)
        for j, (c, v) in enumerate(zip(cs, vs)):
            if c > budget:
                continue
            cand = np.full(budget + 1, np.inf)
            cand[c:] = best[:budget + 1 - c] + v
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    if not np.isfinite(best).any():
        return None
    c = int(np.argmin(best))   # the first of equal values: the cheapest of the best
    picks = []
    for i in range(len(costs) - 1, -1, -1):
        j = int(choice[i, c])
        picks.append(j)
        c -= costs[i][j]
    return picks[::-1]


def choose_widths(sens: Mapping[str, Mapping[int, float]], nbytes: Mapping[str, Mapping[int, int]],
                  budget: int) -> dict[str, int]:
    """One width per layer minimising the summed sensitivity with the summed bytes <= ``budget``
    (:func:`knapsack` over units of ``ceil(budget / MAX_UNITS)`` bytes, costs rounded up).

    Raises ValueError when even the narrowest widths exceed the budget.
    """
    names = list(sens)
    widths = [sorted(sens[n]) for n in names]
    least = sum(min(nbytes[n].values()) for n in names)
    if least > budget:
        raise ValueError(f"the narrowest widths need {least} bytes, above the budget of {budget}")
    unit = max(1, math.ceil(budget / MAX_UNITS))
    costs = [[math.ceil(nbytes[n][b] / unit) for b in ws] for n, ws in zip(names, widths)]
    values = [[float(sens[n][b]) for b in ws] for n, ws in zip(names, widths)]
    picks = knapsack(costs, values, budget // unit)
    if picks is None:   # only the rounding up lost it: the narrowest widths fit
        return {n: min(nbytes[n], key=lambda b: nbytes[n][b]) for n in names}
    return {n: ws[j] for n, ws, j in zip(names, widths, picks)}


@torch.no_grad()
def reestimate_bn(model: nn.Module, chunks: list[Tensor], reduce: Callable[[Tensor], None] | None = None) -> None:
    """Every BatchNorm's running statistics set to those of ``chunks`` (cumulative average over
    the chunks; the rest of the network in eval mode). ``reduce`` sums a tensor over ranks in
    place: the statistics are then the average over every rank's chunks, as one process would
    have them on all the chunks (each chunk's batch statistics do not depend on the others')."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in chunks:
            model(x.clone())
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    if reduce is not None:
        count = torch.tensor([float(len(chunks))], dtype=torch.float64, device=bns[0].running_mean.device)
        sums = torch.cat([torch.cat([m.running_mean, m.running_var]).double() * count for m in bns])
        reduce(count)
        reduce(sums)
        if count.item() > 0:
            at = 0
            for m in bns:
                c = m.running_mean.numel()
                m.running_mean.copy_(sums[at:at + c] / count)
                m.running_var.copy_(sums[at + c:at + 2 * c] / count)
                m.num_batches_tracked.fill_(int(count.item()))
                at += 2 * c


@torch.no_grad()
def sensitivities(model: nn.Module, names: list[str], chunks: list[Tensor],
                  decide: Callable[[str, int], tuple[Tensor, Tensor]], widths=WIDTHS,
                  reduce: Callable[[Tensor], None] | None = None) -> dict[str, dict[int, float]]:
    """Each layer's sensitivity per width (module docstring): ``{layer: {bits: mean KL}}``.

    ``model`` is in eval mode, full precision; it is left as it was (weights, BatchNorm
    statistics). ``decide(name, bits)`` returns (codes, scale) of the layer's weight at ``bits``
    (it is called for one layer's widths in a row). ``reduce`` sums a tensor over ranks in place
    (each rank measures on its own chunks; the result is then the same on every rank).
    """
    modules = dict(model.named_modules())
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved_bn = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    reestimate_bn(model, chunks, reduce)   # the reference too: only the layer's quantization differs
    reference = [torch.log_softmax(model(x.clone()).float(), dim=-1) for x in chunks]
    table = torch.zeros(len(names), len(widths) + 1, dtype=torch.float64, device=modules[names[0]].weight.device)
    for i, name in enumerate(names):
        module = modules[name]
        original = module.weight.detach().clone()
        for k, bits in enumerate(widths):
            codes, scale = decide(name, bits)
            module.weight.copy_((codes * scale[:, None]).reshape(original.shape).to(original.dtype))
            reestimate_bn(model, chunks, reduce)
            for x, ref in zip(chunks, reference):
                logp = torch.log_softmax(model(x.clone()).float(), dim=-1)
                table[i, k] += float((ref.exp() * (ref - logp)).sum())
            module.weight.copy_(original)
        table[i, -1] = sum(x.shape[0] for x in chunks)
    for m, (mean, var, count) in zip(bns, saved_bn):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)
    if reduce is not None:
        reduce(table)
    return {n: {b: float(table[i, k] / table[i, -1].clamp_min(1)) for k, b in enumerate(widths)}
            for i, n in enumerate(names)}
