"""Bit packing: integer codes of 1 to 8 bits, densely in uint8, least significant bit first.

A code ``c`` of ``bits`` bits is stored as ``c > 0`` when ``bits == 1`` (codes are +-1), else as
``c + L_max`` (:func:`code_offset`); codes from a codebook (``code_levels()``) are stored as their
index in it (:func:`pack_indexed`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import bitpack
from .format import MAX_BITS, ExportError


def code_offset(bits: int) -> int:
    """``L_max = 2^(bits-1) - 1``: codes lie in ``[-L_max, L_max]`` (``{-1, +1}`` when ``bits == 1``)."""
    return 2 ** (bits - 1) - 1 if bits > 1 else 1


def _check_bits(bits, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ExportError(f"{where}: bits={bits!r}; allowed: an integer from 1 to {MAX_BITS}")
    return bits


def code_levels(quantizer, bits: int, where: str) -> list[int] | None:
    """The quantizer's codebook (``code_levels()``), checked: sorted distinct ints in int8, at most
    ``2^bits`` of them; None when it has none (codes are the symmetric range of ``bits``)."""
    fn = getattr(quantizer, "code_levels", None)
    if fn is None:
        return None
    levels = fn()
    ok = (isinstance(levels, (list, tuple)) and 0 < len(levels) <= 2 ** bits
          and all(isinstance(v, int) and not isinstance(v, bool) and -128 <= v <= 127 for v in levels)
          and list(levels) == sorted(set(levels)))
    if not ok:
        raise ExportError(f"{where}: code_levels()={levels!r}; allowed: sorted distinct integers in [-128, 127], "
                          f"at most 2^{bits} of them")
    return list(levels)


def checked_codes(codes: Tensor, bits: int, where: str, levels: list[int] | None = None) -> Tensor:
    """``codes`` as int8 on the CPU, after checking they are integers that fit ``bits``.

    ``bits == 1``: codes must be +-1; otherwise in ``[-L_max, L_max]`` (:func:`code_offset`).
    With a codebook ``levels`` (:func:`code_levels`), every code must be one of them.
    """
    c = codes.detach().cpu()
    if c.is_floating_point():
        if not bool(torch.isfinite(c).all()) or not torch.equal(c, torch.round(c)):
            raise ExportError(f"{where}: codes are not integer-valued")
    else:
        c = c.long()  # abs() of int8 -128 would wrap
    limit = code_offset(bits)
    if levels is not None:
        bad = ~torch.isin(c.long(), torch.tensor(levels, dtype=torch.long))
        allowed = f"the quantizer's code_levels() {levels}"
    elif bits == 1:
        bad = (c != 1) & (c != -1)
        allowed = "-1 or +1"
    else:
        bad = c.abs() > limit
        allowed = f"integers in [{-limit}, {limit}]"
    if bool(bad.any()):
        raise ExportError(f"{where}: code {int(c[bad][0])} does not fit {bits} bit(s); allowed: {allowed}")
    return c.to(torch.int8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer-valued ``codes`` (any shape, numel n) into uint8 ``(ceil(n * bits / 8),)``.

    ``bits == 1``: codes must be +-1, stored as ``code > 0``. Otherwise codes must lie in
    ``[-L_max, L_max]`` (see :func:`code_offset`) and are stored as ``code + L_max``.
    Fields are written least significant bit first along the flattened tensor.
    """
    _check_bits(bits, "pack_codes")
    c = checked_codes(codes, bits, "pack_codes").reshape(-1)
    limit = code_offset(bits)
    fields = (c > 0).to(torch.uint8) if bits == 1 else (c.to(torch.int16) + limit).to(torch.uint8)  # range checked
    return pack_fields(fields, bits)


def pack_indexed(codes: Tensor, levels: list[int], bits: int) -> Tensor:
    """Pack ``codes`` (each one of ``levels``) as their indices into ``levels``, ``bits`` bits each."""
    _check_bits(bits, "pack_indexed")
    c = checked_codes(codes, bits, "pack_indexed", levels).reshape(-1).long()
    table = torch.tensor(levels, dtype=torch.long)
    return pack_fields(torch.searchsorted(table, c).to(torch.uint8), bits)


def unpack_indexed(packed: Tensor, levels: list[int], bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_indexed`: int8 codes ``(numel,)``."""
    fields = unpack_fields(packed, bits, numel)
    if bool((fields >= len(levels)).any()):
        raise ExportError(f"packed codes: an index exceeds the {len(levels)} code levels (corrupted data)")
    return torch.tensor(levels, dtype=torch.int8)[fields.long()]


def pack_fields(fields: Tensor, bits: int) -> Tensor:
    """uint8 ``fields`` (n,), each below ``2^bits``, packed densely, least significant bit first
    (:func:`sqdist.bitpack.pack`)."""
    return bitpack.pack(fields, bits)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``(ceil(numel * bits / 8),)`` -> int8 codes ``(numel,)``.

    Raises :class:`ExportError` when the byte count is wrong or a field holds a value no
    code maps to (a corrupted file).
    """
    _check_bits(bits, "unpack_codes")
    fields = unpack_fields(packed, bits, numel)
    limit = code_offset(bits)
    if bits == 1:
        return fields.to(torch.int8) * 2 - 1
    if bool((fields > 2 * limit).any()):
        raise ExportError(f"packed codes: a {bits}-bit field exceeds {2 * limit} (corrupted data)")
    return (fields.to(torch.int16) - limit).to(torch.int8)


def unpack_fields(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_fields`: uint8 ``(numel,)``; checks the byte count and the padding."""
    expected = bitpack.packed_size(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ExportError(f"packed codes: expected uint8 of {expected} bytes for {numel} x {bits} bits, "
                          f"got {packed.dtype} of shape {tuple(packed.shape)}")
    if bits != 8 and bitpack.padding_set(packed, bits, numel):
        raise ExportError("packed codes: padding bits are set (corrupted data)")
    return bitpack.unpack(packed, bits, numel).to(torch.uint8)
