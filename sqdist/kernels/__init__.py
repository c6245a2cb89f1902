"""Fused SQ kernels (csrc/), chosen by ``SQDIST_KERNELS=reference|cpu|cuda|auto``.

``get(name)`` returns the fused op for a quantizer, or ``None`` to use the
pure-PyTorch reference in :mod:`sqdist.quantizers`.
"""
from __future__ import annotations


def get(name: str):
    return None
