"""Learned step sizes and clipping values: positive and finite by construction.

A learned step (LSQ, k-bit ``scale="lsq"``, a plugin's) or clipping value (PACT) is a parameter the
optimizer moves freely; a quantizer uses :func:`positive_step` of it, and a calibration sets it
through :func:`initial_step`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

STEP_FLOOR = 2.0 ** -20  # the least step (or clipping value) a learned parameter can stand for; exact in fp16/bf16


def positive_step(p: Tensor) -> Tensor:
    """The step size (or clipping value) that a learned parameter ``p`` stands for: ``max(|p|, STEP_FLOOR)``.

    Positive and finite by construction (for a finite ``p``): an SGD step can carry ``p`` across 0,
    and a raw ``p <= 0`` would make the layer dead (every unsigned input on code 0, the step's
    gradient exactly 0) or NaN (``x / 0``). The gradient is ``sign(p)`` (1 at ``p = 0``, so ``p``
    can leave 0) and passes the floor straight through, so a floored step still learns. ``p``
    any shape; the result has its shape.
    """
    magnitude = torch.where(p >= 0, p, -p)
    return magnitude + (magnitude.clamp(min=STEP_FLOOR) - magnitude).detach()


def initial_step(value) -> float:
    """A calibrated step: ``value`` (a number or a one-element tensor) when it is positive and finite,
    else 1.0. An all-zero calibration input gives 0 (no scale to learn from; any step represents 0
    exactly), and a step of 0 would be a dead or NaN layer."""
    value = float(value)
    return value if 0 < value < math.inf else 1.0
